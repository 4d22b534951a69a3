"""Model families as data: where the decoder layers are, what stays unquantized, how linears are grouped.

One frozen declaration per family and one visible dict from ``config.model_type`` to it. Module paths are those of
the runtime model of the installed transformers (``model.language_model.layers.N...``); ``disk_prefixes`` maps them
to the checkpoint keys ``save_pretrained`` writes (``model.layers.N...``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScalingGroup:
    """An AWQ smoothing group: ``prev`` (a norm or linear) feeds ``linears``; ``inspect`` is the module whose output
    the scale search measures (None: the linears themselves)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None


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
    needs_remote_code: bool = False

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

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

    def unquantized_disk_names(self) -> list[str]:
        """What ``modules_to_not_convert`` must list: both layouts, since transformers 5 matches the runtime name
        and a bare "visual" protects nothing (shared/design/INTEROP.md)."""
        names = []
        for path in self.not_quantized:
            names += [self.to_disk(path + ".")[:-1], path]
        return list(dict.fromkeys(names))


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
)

FAMILIES: dict[str, ModelFamily] = {
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_VL,
    "qwen3_vl": QWEN3_VL,
    "qwen": QWEN_VL_V1,  # Qwen-VL-Chat's config.json says model_type "qwen"
}


def family_for(model_type: str) -> ModelFamily:
    """The declaration for ``model_type``; an error listing the supported types otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(f"model_type {model_type!r} is not supported by qvlquant; supported: {supported}") from None
