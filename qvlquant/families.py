"""Model families as data: where the decoder layers are, what stays unquantized, how linears are grouped.

One frozen declaration per family and one visible dict from ``config.model_type`` to it. Module paths are those of
the runtime model of the installed transformers (``model.language_model.layers.N...``); ``disk_prefixes`` maps them
to the checkpoint keys ``save_pretrained`` writes (``model.layers.N...``).

Hybrid models (Qwen3.5: Gated DeltaNet and full-attention layers) declare a ``LayerLayout`` per layer type; the
family bound to a model's config (``bind``) knows each layer's type, and ``at(i)`` is the declaration of layer i,
with the fields every per-layer user reads (``linear_groups``, ``scaling_groups``, ``fused``, ...). A family whose
layers are all alike has no layouts: ``at(i)`` is itself.

Mixture-of-experts models (Qwen3.5-MoE, Qwen3-VL-MoE) declare their experts' linears once, with ``{e}`` where the
expert's index goes (``mlp.experts.{e}.gate_proj``); ``bind`` writes one name, group and rule per expert of the
config. transformers holds the experts as fused 3-D parameters; ``experts`` names that module, which qvlquant runs as
one linear per expert (``qvlquant.engine.experts``), so that each expert is quantized from the tokens its router
sends it. A checkpoint that stores them fused too (Qwen3-VL-MoE's) is read one expert's slice at a time, as
``fused_experts`` says where each linear lies.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

EXPERT = "{e}"  # in a declared module name: each expert's index, written by ``bind``


@dataclasses.dataclass(frozen=True)
class ScalingGroup:
    """An AWQ smoothing group: ``prev`` (a norm or linear) feeds ``linears``; ``inspect`` is the module whose output
    the scale search measures (None: the linears themselves)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """What one type of decoder layer holds: the ``ModelFamily`` fields of the same names, for its layers only."""

    linear_groups: tuple[tuple[str, ...], ...]
    scaling_groups: tuple[ScalingGroup, ...]
    fused: tuple[tuple[str, tuple[str, ...]], ...]
    column_parallel: tuple[str, ...]
    row_parallel: tuple[str, ...]
    clip_skipped: tuple[str, ...] = ()
    attention: str = "self_attn"
    attention_kwargs: tuple[str, ...] = ("attention_mask", "position_ids", "position_embeddings")


PER_LAYER = tuple(f.name for f in dataclasses.fields(LayerLayout))  # the ModelFamily fields a layout replaces


def layout_of(family: "ModelFamily") -> LayerLayout:
    """The layout of a family whose decoder layers are all alike, made of its own per-layer fields: for a hybrid
    family's layer type that is that family's layer (Qwen3.5's full-attention layers are Qwen3-VL's)."""
    return LayerLayout(**{name: getattr(family, name) for name in PER_LAYER})


@dataclasses.dataclass(frozen=True)
class ExpertSlice:
    """Where one expert linear's weight [out, in] lies in the tensor a checkpoint stores for all of a layer's experts
    fused: ``tensor`` (its name under the experts module, ``gate_up_proj``), expert e's entry of its first axis, and
    the ``part``-th of ``parts`` equal blocks along the linear's outputs (gate: the first half of ``gate_up_proj``'s,
    up: the second). Such a tensor holds [E, parts x out, in] (transformers 5's parameters, what ``save_pretrained``
    writes) or its transpose [E, in, parts x out]: ``qvlquant.engine.experts.fused_layout`` tells them apart."""

    tensor: str
    part: int = 0
    parts: int = 1


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    decoder_layers: str  # runtime path of the ModuleList of decoder layers
    vision_tower: str  # runtime path of the vision tower (never quantized)
    # Linears of one decoder layer in execution order; each tuple reads the same input (one Hessian per tuple).
    linear_groups: tuple[tuple[str, ...], ...]
    scaling_groups: tuple[ScalingGroup, ...]
    not_quantized: tuple[str, ...]  # runtime paths kept in full precision
    disk_prefixes: tuple[tuple[str, str], ...]  # (runtime prefix, checkpoint prefix)
    language_model: str = "model.language_model"  # runtime path of the text model that runs the decoder layers
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # their outputs form the MLP's intermediate
    mlp_out: str = "mlp.down_proj"
    # Qwen3-VL: visual features re-added to the hidden states of the visual tokens after the first decoder layers
    # (the text model receives them as ``visual_pos_masks`` and ``deepstack_visual_embeds``).
    deepstack: bool = False
    deepstack_kwargs: tuple[str, str] = ("visual_pos_masks", "deepstack_visual_embeds")  # what the text model receives
    needs_remote_code: bool = False
    embed_tokens: str = "model.language_model.embed_tokens"  # runtime path of the token embedding
    lm_head: str = "lm_head"
    # AWQ: the attention module its scale search runs, and the keyword arguments (from what the decoder layer
    # receives) that module needs; linears whose clipping search is skipped (q/k: the softmax hides their errors).
    attention: str = "self_attn"
    attention_kwargs: tuple[str, ...] = ("attention_mask", "position_ids", "position_embeddings")
    clip_skipped: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    # vLLM tensor parallelism: linears split along their outputs (column) and along their inputs (row)
    column_parallel: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                        "mlp.up_proj")
    row_parallel: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # vLLM runs these linears as one layer (its packed_modules_mapping): (fused name, its linears); they need one
    # quantization setting, and per-module configs must name the fused layer too
    fused: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    )
    # Hybrid models: (layer type as the text config's ``layer_types`` names it, its layout); the fields above then
    # hold the union over the layouts (for matching names), and ``at(i)`` the layout of layer i. () : layers alike.
    layouts: tuple[tuple[str, LayerLayout], ...] = ()
    layer_types: tuple[str, ...] = ()  # the type of each decoder layer, once bound to a config (``bind``)
    # Hybrid models whose config has no ``layer_types`` list: how the types follow from the text config's fields
    # (called with a function reading one field, None when absent; a ValueError names a field it cannot use)
    layer_types_from: Callable[[Callable[[str], object]], tuple[str, ...]] | None = None
    # Norms that scale by (norm_offset + weight) (Qwen3.5's zero-centred RMSNorm: 1): AWQ folds its scales there
    norm_offset: float = 0.0
    # Checkpoint key prefixes of tensors transformers does not load (Qwen3.5's MTP head, ``mtp.``): the export copies
    # them from the base checkpoint as they are (dtype and bytes)
    carried: tuple[str, ...] = ()
    # Decoder-layer linears kept in full precision and never quantized (an MoE block's router and shared-expert gate:
    # serving stacks build them without a quantization config); compressed-tensors' ``ignore`` names them, since its
    # config group targets every Linear
    kept: tuple[str, ...] = ()
    # Mixture of experts: the fused experts module of a decoder layer (transformers 5's ``gate_up_proj`` [E, 2I, H]
    # and ``down_proj`` [E, H, I] parameters; "" : none), the names of one expert's gate, up and down linears, the
    # text config's field counting the experts (the first of these names it has), and the count once bound
    experts: str = ""
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    experts_field: tuple[str, ...] = ("num_experts",)
    expert_count: int = 0
    # Checkpoints storing each layer's experts fused: where each of ``expert_linears`` lies (() : one tensor per
    # expert linear, ``mlp.experts.{e}.gate_proj.weight``, as Qwen3.5-MoE's)
    fused_experts: tuple[ExpertSlice, ...] = ()
    routed_field: str = "num_experts_per_tok"  # the text config's field: experts each token is sent to
    routed: int = 0  # that count, once bound
    # Fused layers (of ``fused``) vLLM's model builds without naming them in its quantization config's
    # ``packed_modules_mapping`` (vLLM 0.33's Qwen3-VL-MoE: its dense MLP's ``mlp.gate_up_proj``): GPTQ's
    # ``modules_in_block_to_quantize`` must name them, or vLLM builds them unquantized
    unmapped_fused: tuple[str, ...] = ()
    # Text-config fields a serving stack reads that transformers' config class lacks, with the value that does what
    # transformers' model does: an export's config.json gets those its base lacks (vLLM 0.33's Qwen3-VL-MoE reads
    # ``norm_topk_prob`` and fails without it; transformers' router always renormalises the top-k weights)
    serving_fields: tuple[tuple[str, object], ...] = ()

    def bind(self, config) -> ModelFamily:
        """This family knowing each decoder layer's type, from ``config`` (or its ``text_config``; an object or
        config.json's dict) ``layer_types`` (or as ``layer_types_from`` derives them), and its experts' count;
        itself when its layers are alike. A ValueError names a type it does not declare, or the field it cannot use."""
        text = (config.get("text_config") or config) if isinstance(config, dict) else getattr(config, "text_config", config)
        field = (lambda k: text.get(k)) if isinstance(text, dict) else (lambda k: getattr(text, k, None))
        family = self
        if self.experts and not self.expert_count:
            named = " / ".join(self.experts_field)
            count = next((v for v in map(field, self.experts_field) if v is not None), None)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{self.name}: config {named} is {count!r}; a mixture-of-experts model needs a "
                                 "positive expert count")
            routed = field(self.routed_field)
            if not isinstance(routed, int) or not 1 <= routed <= count:
                raise ValueError(f"{self.name}: config {self.routed_field} is {routed!r}; it must be between 1 and "
                                 f"{named} ({count})")
            family = dataclasses.replace(_with_experts(self, count), routed=routed)
        if not family.layouts:
            return family
        if self.layer_types_from is not None:
            try:
                types = tuple(self.layer_types_from(field))
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}") from None
        else:
            types = tuple(field("layer_types") or ())
        unknown = sorted(set(types) - {t for t, _ in self.layouts})
        if not types or unknown:
            raise ValueError(f"{self.name}: config layer_types {list(types)[:8]} name "
                             f"{unknown or 'no layer'}; qvlquant knows {[t for t, _ in self.layouts]}")
        return dataclasses.replace(family, layer_types=types)

    def at(self, i: int) -> ModelFamily:
        """The declaration of decoder layer ``i``: per-layer fields from its type's layout (itself when the layers
        are alike)."""
        if not self.layouts:
            return self
        if not self.layer_types:
            raise RuntimeError(f"{self.name} has layers of different types: bind it to the model's config first")
        return _layout_view(self, self.layer_types[i])

    def layer_type(self, i: int) -> str | None:
        return self.layer_types[i] if self.layouts else None

    def first_layers(self) -> dict[int, str]:
        """The first decoder layer of each type, {index: type}, in layer order ({} when the layers are alike)."""
        first: dict[str, int] = {}
        for i, t in enumerate(self.layer_types if self.layouts else ()):
            first.setdefault(t, i)
        return {i: t for t, i in first.items()}

    def expert_of(self, linear: str) -> int | None:
        """The expert index in a linear's name (``mlp.experts.5.up_proj`` -> 5); None for a linear of no expert."""
        head = self.experts + "."
        if not self.experts or not linear.startswith(head):
            return None
        index = linear[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def expert_template(self, linear: str) -> str:
        """A linear's name with its expert index as ``{e}`` (itself for a linear of no expert): what the experts'
        copies of one linear share."""
        e = self.expert_of(linear)
        return linear if e is None else f"{self.experts}.{EXPERT}{linear[len(self.experts) + 1 + len(str(e)):]}"

    def index_of(self, layer_prefix: str) -> int:
        """``model.language_model.layers.3`` -> 3."""
        return int(layer_prefix[len(self.decoder_layers) + 1:].split(".", 1)[0])

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def fused_name(self, linear: str) -> str | None:
        """The name vLLM gives the fused layer that ``linear`` (``self_attn.q_proj``) is part of; None if none."""
        return next((name for name, parts in self.fused if linear in parts), None)

    def to_disk(self, runtime_name: str) -> str:
        for runtime, disk in self.disk_prefixes:
            if runtime_name.startswith(runtime):
                return disk + runtime_name[len(runtime):]
        return runtime_name

    def to_runtime(self, disk_name: str) -> str:
        for runtime, disk in self.disk_prefixes:
            if disk_name.startswith(disk):
                return runtime + disk_name[len(disk):]
        return disk_name

    def is_layer_key(self, runtime_name: str) -> bool:
        return runtime_name.startswith(self.decoder_layers + ".")

    def compressed_ignore(self) -> list[str]:
        """compressed-tensors ``ignore``: lm_head and every module of the vision tower, in either layout, and the
        ``kept`` linears of every decoder layer (``re:.*\\.mlp\\.gate$``)."""
        leaf = self.vision_tower.rsplit(".", 1)[-1]
        return [self.lm_head, f"re:.*{leaf}.*"] + [f"re:.*\\.{re.escape(name)}$" for name in self.kept]

    def unquantized_disk_names(self) -> list[str]:
        """What ``modules_to_not_convert`` must list: both layouts, since transformers 5 matches the runtime name
        and a bare "visual" protects nothing: its matcher anchors a pattern at the start of the runtime name or
        matches it as a suffix (transformers' ``quantizers_utils.should_convert_module``)."""
        names = []
        for path in self.not_quantized:
            names += [self.to_disk(path + ".")[:-1], path]
        return list(dict.fromkeys(names))

    def not_converted_names(self) -> list[str]:
        """What ``modules_to_not_convert`` must list so that every loader keeps the unquantized parts: both
        checkpoint layouts for transformers (``unquantized_disk_names``), and the bare leaf (``visual``) for vLLM,
        whose Qwen-VL name mappers turn ``model.visual.`` into ``visual.`` only with the trailing dot (so Qwen3-VL's
        ``model.visual`` protects nothing there)."""
        leaves = [path.rsplit(".", 1)[-1] for path in self.not_quantized]
        return list(dict.fromkeys(self.unquantized_disk_names() + leaves))


QWEN2_VL = ModelFamily(
    name="qwen2_vl",
    decoder_layers="model.language_model.layers",
    vision_tower="model.visual",
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    scaling_groups=(
        ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    not_quantized=("model.visual", "lm_head"),
    disk_prefixes=(
        ("model.language_model.", "model."),
        ("model.visual.", "visual."),
    ),
)

# Qwen3-VL: same linear layout (q_norm / k_norm are RMSNorms inside attention and are never quantized), checkpoints
# saved in the runtime layout, and DeepStack features to re-add during replay.
QWEN3_VL = dataclasses.replace(QWEN2_VL, name="qwen3_vl", disk_prefixes=(), deepstack=True)

# Qwen-VL / Qwen-VL-Chat (first generation): Qwen-7B with remote modelling code. Its MLP computes
# c_proj(w1(x) * silu(w2(x))); 256 image tokens per picture come from `<img>path</img>` in the text.
QWEN_VL_V1 = ModelFamily(
    name="qwen_vl_v1",
    decoder_layers="transformer.h",
    vision_tower="transformer.visual",
    linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
    scaling_groups=(
        ScalingGroup("ln_1", ("attn.c_attn",), "attn"),
        ScalingGroup("ln_2", ("mlp.w1", "mlp.w2"), "mlp"),
        ScalingGroup("mlp.w1", ("mlp.c_proj",)),
    ),
    not_quantized=("transformer.visual", "lm_head"),
    disk_prefixes=(),
    language_model="transformer",
    mlp_in=("mlp.w1", "mlp.w2"),
    mlp_out="mlp.c_proj",
    needs_remote_code=True,
    embed_tokens="transformer.wte",
    # QWenBlock passes these to QWenAttention (its remote modelling code)
    attention="attn",
    attention_kwargs=("rotary_pos_emb_list", "attention_mask"),
    # c_attn is q, k and v fused: two thirds of its rows are q/k, whose errors the softmax hides, so it is not
    # clipped either (AutoAWQ matches none of its exclusion names against "c_attn" and clips it whole)
    clip_skipped=("attn.c_attn",),
    column_parallel=("attn.c_attn", "mlp.w1", "mlp.w2"),
    row_parallel=("attn.c_proj", "mlp.c_proj"),
    fused=(("mlp.gate_up_proj", ("mlp.w2", "mlp.w1")),),  # vLLM's QWenMLP; c_attn is fused in the checkpoint
)

@functools.cache
def _layout_view(family: ModelFamily, layer_type: str) -> ModelFamily:
    layout = dict(family.layouts)[layer_type]
    return dataclasses.replace(family, layouts=(), layer_types=(), **{f: getattr(layout, f) for f in PER_LAYER})


def _expand(value, count: int):
    """A declared per-layer value with each ``{e}`` written out for experts 0..count-1: a name becomes count names,
    a group (tuple of names) or ScalingGroup count groups; a fused entry (name, linears) whose name has ``{e}``
    count entries, and one whose name has none (a layer running every expert, vLLM's FusedMoE ``mlp.experts``)
    stays one entry listing every expert's linears, expert by expert; the rest stays."""
    def has(v) -> bool:
        if isinstance(v, str):
            return EXPERT in v
        if isinstance(v, ScalingGroup):
            return has(v.prev) or any(map(has, v.linears))
        return isinstance(v, tuple) and any(map(has, v))

    def put(v, e: int):
        if isinstance(v, str):
            return v.replace(EXPERT, str(e))
        if isinstance(v, ScalingGroup):
            return ScalingGroup(put(v.prev, e), put(v.linears, e), v.inspect and put(v.inspect, e))
        return tuple(put(x, e) for x in v) if isinstance(v, tuple) else v

    if not isinstance(value, tuple):
        return value
    out = []
    for item in value:
        if _is_fused_entry(item) and not has(item[0]) and has(item[1]):
            out.append((item[0], tuple(put(p, e) for e in range(count) for p in item[1])))
        else:
            out += [put(item, e) for e in range(count)] if has(item) else [item]
    return tuple(out)


def _is_fused_entry(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], tuple)


def _with_experts(family: ModelFamily, count: int) -> ModelFamily:
    """``family`` with its ``{e}`` names written out for ``count`` experts, in its fields and its layouts'."""
    layouts = tuple((t, dataclasses.replace(lay, **{f: _expand(getattr(lay, f), count) for f in PER_LAYER}))
                    for t, lay in family.layouts)
    return dataclasses.replace(family, layouts=layouts, expert_count=count,
                               **{f: _expand(getattr(family, f), count) for f in PER_LAYER})


def hybrid(family: ModelFamily, layouts: tuple[tuple[str, LayerLayout], ...]) -> ModelFamily:
    """``family`` with a layout per layer type; its own per-layer fields become the union of the layouts' (what
    name matching over all layers needs), in the order the layouts give them."""
    union = {f: tuple(dict.fromkeys(x for _, lay in layouts for x in getattr(lay, f))) for f in PER_LAYER
             if f not in ("attention", "attention_kwargs")}
    return dataclasses.replace(family, layouts=layouts, **union)


_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_MLP_SCALING = (ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                ScalingGroup("mlp.up_proj", ("mlp.down_proj",)))
_GDN_IN = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a")

# Qwen3.5 / Qwen3.6 (dense): three Gated DeltaNet layers (``linear_attn``) per gated full-attention layer (its q_proj
# yields the query and the output gate), as config.text_config.layer_types says. The DeltaNet's conv1d, A_log,
# dt_bias and gated norm are no linears: kept as they are. Its out_proj reads the gated norm's output, whose weight
# is shared by every head, so no AWQ scale folds into it. vLLM fuses in_proj_qkv+z and in_proj_b+a.
QWEN3_5 = hybrid(dataclasses.replace(QWEN3_VL, name="qwen3_5", deepstack=False, norm_offset=1.0, carried=("mtp.",)), (
    ("linear_attention", LayerLayout(
        linear_groups=(_GDN_IN, ("linear_attn.out_proj",)) + _MLP,
        scaling_groups=(ScalingGroup("input_layernorm", _GDN_IN, "linear_attn"),) + _MLP_SCALING,
        fused=(("linear_attn.in_proj_qkvz", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z")),
               ("linear_attn.in_proj_ba", ("linear_attn.in_proj_b", "linear_attn.in_proj_a")),
               ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))),
        column_parallel=_GDN_IN + ("mlp.gate_proj", "mlp.up_proj"),
        row_parallel=("linear_attn.out_proj", "mlp.down_proj"),
        # in_proj_qkv: two thirds q / k, L2-normalised in the delta rule (as q/k under the softmax)
        clip_skipped=("linear_attn.in_proj_qkv",),
        attention="linear_attn",
        attention_kwargs=("attention_mask",),
    )),
    ("full_attention", layout_of(QWEN3_VL)),
))

# Qwen3.5-MoE / Qwen3.6-MoE: Qwen3.5's hybrid layers with a sparse MoE block as every layer's MLP: a shared expert
# (its output scaled by the sigmoid of ``shared_expert_gate``, a 1-row linear kept as it is), the top-k router
# ``mlp.gate`` (kept), and the routed experts, each quantized as its own gate / up / down linears. AWQ smooths
# within each expert (up -> down) and the shared expert only: a scale folded into post_attention_layernorm would
# also reach the router and change which experts the tokens go to. vLLM runs a layer's routed experts as one
# FusedMoE layer (``mlp.experts``) of one setting, so all of them are one fused entry.
_MOE = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",),
        ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), ("mlp.experts.{e}.down_proj",))
_MOE_SCALING = (ScalingGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),
                ScalingGroup("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",)))
_MOE_FUSED = (("mlp.shared_expert.gate_up_proj", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
              ("mlp.experts", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")))
_MOE_COLUMN = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.experts.{e}.gate_proj",
               "mlp.experts.{e}.up_proj")
_MOE_ROW = ("mlp.shared_expert.down_proj", "mlp.experts.{e}.down_proj")


def _moe_layout(layout: LayerLayout) -> LayerLayout:
    """A Qwen3.5 layer layout with the MoE block in place of the dense MLP."""
    mlp = lambda names: tuple(n for n in names if not n.startswith("mlp."))  # noqa: E731
    return dataclasses.replace(
        layout,
        linear_groups=tuple(g for g in layout.linear_groups if not g[0].startswith("mlp.")) + _MOE,
        scaling_groups=tuple(g for g in layout.scaling_groups if not g.linears[0].startswith("mlp.")) + _MOE_SCALING,
        fused=tuple(f for f in layout.fused if not f[0].startswith("mlp.")) + _MOE_FUSED,
        column_parallel=mlp(layout.column_parallel) + _MOE_COLUMN,
        row_parallel=mlp(layout.row_parallel) + _MOE_ROW,
    )


QWEN3_5_MOE = hybrid(dataclasses.replace(QWEN3_5, name="qwen3_5_moe", layouts=(), experts="mlp.experts",
                                         kept=("mlp.gate", "mlp.shared_expert_gate"),
                                         mlp_in=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                         mlp_out="mlp.shared_expert.down_proj"),
                     tuple((t, _moe_layout(lay)) for t, lay in QWEN3_5.layouts))


def _sparse_or_dense(field: Callable[[str], object]) -> tuple[str, ...]:
    """Qwen3-VL-MoE's (and Qwen3-MoE's) layer types, as transformers' ``Qwen3VLMoeTextDecoderLayer`` chooses its MLP:
    layer i is "sparse" (the MoE block) unless ``mlp_only_layers`` lists it or i + 1 is no multiple of
    ``decoder_sparse_step``, then "dense" (an MLP). Absent fields take transformers' defaults (1 and [])."""
    layers, step, dense = field("num_hidden_layers"), field("decoder_sparse_step"), field("mlp_only_layers")
    step = 1 if step is None else step
    dense = [] if dense is None else dense
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not whole(layers) or layers < 1:
        raise ValueError(f"config num_hidden_layers is {layers!r:.80}; it must be a whole number of at least 1")
    if not whole(step) or step < 1:
        raise ValueError(f"config decoder_sparse_step is {step!r:.80}; it must be a whole number of at least 1 "
                         "(every step-th layer holds the experts)")
    if not isinstance(dense, list) or not all(whole(i) and 0 <= i < layers for i in dense):
        raise ValueError(f"config mlp_only_layers is {dense!r:.80}; it must list layer indices from 0 to "
                         f"{layers - 1}")
    return tuple("dense" if i in dense or (i + 1) % step else "sparse" for i in range(layers))


# Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL (DeepStack, checkpoints in the runtime names) whose decoder
# layers hold, by the config (``_sparse_or_dense``), a sparse MoE block or a dense MLP. The MoE block has a top-k
# router ``mlp.gate`` (kept, not an nn.Linear) and routed experts, no shared expert; AWQ smooths within each expert
# only (a scale folded into post_attention_layernorm would reach the router too). Its published checkpoints store
# each layer's experts fused and transposed, ``mlp.experts.gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H]
# (transformers transposes them at load and writes its own [E, 2I, H] / [E, H, I] at save): read either way, one
# expert at a time. No MLP of every layer to pad (``mlp_in`` / ``mlp_out`` empty: --pad-intermediate-to refused).
# vLLM 0.33 (``qwen3_vl_moe.py`` on ``qwen3_moe.py``) builds the router as a ``GateLinear`` with the checkpoint's
# quantization config, so the configs must keep it (``kept``); a layer's experts are one FusedMoE layer read from
# per-expert names; its dense MLP is one ``gate_up_proj`` that its ``packed_modules_mapping`` never names.
_EXPERTS = (("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), ("mlp.experts.{e}.down_proj",))
QWEN3_VL_MOE = hybrid(
    dataclasses.replace(QWEN3_VL, name="qwen3_vl_moe", experts="mlp.experts", mlp_in=(), mlp_out="", kept=("mlp.gate",),
                        # transformers 5.24 reads num_experts and writes num_local_experts into config.json
                        experts_field=("num_experts", "num_local_experts"), layer_types_from=_sparse_or_dense,
                        unmapped_fused=("mlp.gate_up_proj",), serving_fields=(("norm_topk_prob", True),),
                        fused_experts=(ExpertSlice("gate_up_proj", 0, 2), ExpertSlice("gate_up_proj", 1, 2),
                                       ExpertSlice("down_proj"))),
    (
        ("sparse", LayerLayout(
            linear_groups=QWEN3_VL.linear_groups[:2] + _EXPERTS,
            scaling_groups=QWEN3_VL.scaling_groups[:2] + (ScalingGroup("mlp.experts.{e}.up_proj",
                                                                       ("mlp.experts.{e}.down_proj",)),),
            fused=QWEN3_VL.fused[:1] + _MOE_FUSED[1:],
            column_parallel=QWEN3_VL.column_parallel[:3] + _EXPERTS[0],
            row_parallel=QWEN3_VL.row_parallel[:1] + _EXPERTS[1],
            clip_skipped=QWEN3_VL.clip_skipped,
        )),
        ("dense", layout_of(QWEN3_VL)),
    ))

FAMILIES: dict[str, ModelFamily] = {
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_VL,
    "qwen3_vl": QWEN3_VL,
    "qwen3_5": QWEN3_5,  # Qwen3.5 and Qwen3.6 dense checkpoints both say model_type "qwen3_5"
    "qwen3_5_moe": QWEN3_5_MOE,  # and their MoE checkpoints "qwen3_5_moe"
    "qwen3_vl_moe": QWEN3_VL_MOE,
    "qwen": QWEN_VL_V1,  # Qwen-VL-Chat's config.json says model_type "qwen"
}


def family_for(model_type: str) -> ModelFamily:
    """The declaration for ``model_type``; an error listing the supported types otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(f"model_type {model_type!r} is not supported by qvlquant; supported: {supported}") from None
