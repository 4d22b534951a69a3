

class ToyLayer(torch.nn.Module):
    """A residual layer x + W2 relu(W1 x): what a decoder layer's error measures need (a forward over the
    captured hidden states, named linears)."""

    def __init__(self, w1, w2):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 64, bias=False)
        self.up.weight.data, self.down.weight.data = w1.clone(), w2.clone()

    def forward(self, hidden, use_cache=False):
        return hidden + self.down(torch.relu(self.up(hidden)))


@pytest.mark.parametrize("measure", ["layer", "output"])
def test_errors_of_a_loud_layer_and_a_quiet_one_compare(measure):
    """Layers are weighed alike whatever their scale: the same layer fed inputs 8x larger (a deeper residual
    stream) measures the same relative errors, where absolute errors would differ 64x."""
    from qvlquant.engine.sensitivity import measure_layer
    from qvlquant.quant.layer import LayerInput

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(128, 64, generator=g) / 8, torch.randn(64, 128, generator=g) / 11
    hidden = torch.randn(2, 16, 64, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    plan = plan_for(measure, candidates=(3, 4, 8))
    groups = [("up",), ("down",)]

    def errors(scale):
        return measure_layer(ToyLayer(w1, w2), [LayerInput(scale * hidden, {}, mask)], groups, plan)

    quiet, loud = errors(1.0), errors(8.0)
    for group in groups:
        for bits in (3, 4, 8):
            assert loud[group][bits] == pytest.approx(quiet[group][bits], rel=1e-3), (group, bits)
        assert quiet[group][8] < quiet[group][4] < quiet[group][3] < 0.5


def test_every_fused_layer_lies_inside_one_linear_group():
    """The search gives one width per linear group: a group that split one of vLLM's fused layers would be refused."""
    from qvlquant.families import FAMILIES

    for family in FAMILIES.values():
        for _, parts in family.fused:
            assert any(set(parts) <= set(group) for group in family.linear_groups), (family.name, parts)
