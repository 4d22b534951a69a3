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
        """compressed-tensors ``ignore``: lm_head and every module of the vision tower, in either layout."""
        leaf = self.vision_tower.rsplit(".", 1)[-1]
        return [self.lm_head, f"re:.*{leaf}.*"]

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
