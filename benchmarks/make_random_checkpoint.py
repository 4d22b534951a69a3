"""Write a random-weight checkpoint of a released model's shape (Qwen2-VL-2B / -7B, Qwen3.5-0.8B / -2B / -35B-A3B /
-397B-A17B, Qwen3-VL-30B-A3B), for speed, memory and scale tests.

The released configs (text model, vision tower, vocabulary), bf16 safetensors in 5 GiB shards with an index, and a
processor: the embedded demo's (its word-level tokenizer carries the Qwen special tokens; the config's image / video
/ vision marker ids are set to that tokenizer's, so real multimodal calibration batches run through the model; for
Qwen3.5 its image and video patch size is set to the tower's 16). Speed and memory do not depend on weight values;
accuracy does, so nothing about accuracy is measured on these. Each tensor is generated when its turn comes and
written at once (``qvlquant.storage.shards.write_safetensors``): the script holds one tensor, never the model.

Qwen3.5 checkpoints are written in each family's on-disk layout: the runtime names (``model.language_model.layers.N``,
``model.visual``, ``lm_head``), a MoE model's routed experts one tensor per expert (``mlp.experts.{e}.gate_proj.weight``)
beside ``mlp.gate`` (the router), ``mlp.shared_expert`` and ``mlp.shared_expert_gate``, and the MTP head the released
checkpoints carry (``mtp.fc``, ``mtp.pre_fc_norm_embedding`` / ``_hidden``, ``mtp.norm`` and ``mtp_num_hidden_layers``
full-attention decoder layers ``mtp.layers.N``, as vLLM's ``qwen3_5_mtp.py`` builds them). ``--layers N`` writes the
first N decoder layers only (a 35B-A3B is 67 GB), the config saying N layers (any shape); ``--full-attention-interval K`` sets
which of them are full attention (every K-th, as the released configs' ``full_attention_interval`` 4 does), so that
two layers can hold one of each type.

Qwen3-VL-MoE checkpoints are written as the released ones store them: each layer's routed experts fused and
transposed, ``mlp.experts.gate_up_proj`` [E, H, 2I] and ``mlp.experts.down_proj`` [E, I, H], beside ``mlp.gate``.

    python benchmarks/make_random_checkpoint.py --shape qwen2-vl-7b --output /tmp/qwen2-vl-7b-random
    python benchmarks/make_random_checkpoint.py --shape qwen3.5-35b-a3b --layers 2 --full-attention-interval 2 \\
        --output /tmp/qwen3.5-35b-a3b-2layers
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil

import torch

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.checkpoint.export import plan_shards
from qvlquant.engine.skeleton import build_skeleton
from qvlquant.families import QWEN2_VL, family_for
from qvlquant.storage.shards import INDEX, write_safetensors
from qvlquant.tools.bench import SHAPES, VISION

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")

# The released Qwen3.5 configs, and where each number is from (no number here is made up; none was read from the
# hub, which this project's machines cannot reach):
#   [T]  transformers 5.24 configuration_qwen3_5_moe.py: Qwen3_5MoeTextConfig / Qwen3_5MoeVisionConfig defaults,
#        documented as the Qwen/Qwen3.5-35B-A3B configuration (its vision out_hidden_size default, 3584, is not the
#        35B-A3B's: [O] and [P] say 2048)
#   [P]  mlc-ai/pith-train examples/pretrain_lm/qwen3.5-35b-a3b/config.json (commit 2bdf0836): the 35B-A3B's text
#        config.json (40 layer_types, full_attention_interval 4, mtp_num_hidden_layers 1, rope_parameters, every size)
#   [O]  p-doom/omegalax omegalax/models/qwen3_5/config.py (commit 6f3854e1): per-model specs with hf_repo_id
#        Qwen/Qwen3.5-0.8B, -2B, -35B-A3B, -397B-A17B (text and vision sizes; the 397B's hidden 4096, 32 heads,
#        2 kv heads, 64 linear value heads are its config class's defaults, which its 397B spec does not override)
#   [J]  lawrence3699/Jev-Style-Qwen3.5-2B-Decision-MLX-bf16 config.json (commit 1468e07d): a fine-tune of
#        Qwen3.5-2B keeping its architecture: the 2B's full text_config (agrees with [O])
#   [C]  model-card restatements found by the search tool (chaobro.com, lilting.ch on Qwen3.6-35B-A3B, same
#        architecture per transformers' qwen3_5_moe doc): 40 layers = 10 x (3 DeltaNet + 1 attention), hidden 2048,
#        DeltaNet 32 V / 16 QK heads of 128, attention 16 Q / 2 KV heads of 256, 256 experts, 8 routed + 1 shared,
#        expert intermediate 512, vocabulary 248320 (agrees with [T] and [P])
# Common to every size ([P], [J]; [T] for the defaults): head_dim 256, linear_key_head_dim = linear_value_head_dim
# 128, linear_num_key_heads 16, linear_conv_kernel_dim 4, vocab_size 248320, rms_norm_eps 1e-6, attn_output_gate,
# mRoPE (interleaved, sections [11, 11, 10], theta 1e7, partial_rotary_factor 0.25), one MTP layer; the vision tower's
# patch 16, temporal patch 2, spatial merge 2, 2304 position embeddings, gelu_pytorch_tanh ([T], [O]).
QWEN3_5_COMMON = dict(head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                      linear_conv_kernel_dim=4, vocab_size=248320, rms_norm_eps=1e-6, attn_output_gate=True,
                      max_position_embeddings=262144, mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
                      mamba_ssm_dtype="float32", full_attention_interval=4, hidden_act="silu",
                      rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                       "mrope_interleaved": True, "mrope_section": [11, 11, 10]})
QWEN3_5_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                      temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                      hidden_act="gelu_pytorch_tanh")  # [T]; the 35B-A3B's and (by [O]'s defaults) the 397B's
QWEN3_5 = {  # model_type, text sizes, vision sizes (over QWEN3_5_VISION), tie_word_embeddings, sources
    "qwen3.5-0.8b": ("qwen3_5", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=3584, linear_num_value_heads=16),
                     dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024),
                     True, "[O]"),
    "qwen3.5-2b": ("qwen3_5", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=6144, linear_num_value_heads=16),
                   dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048),
                   True, "text [J] and [O], vision [O]"),
    "qwen3.5-35b-a3b": ("qwen3_5_moe", dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                                            num_key_value_heads=2, linear_num_value_heads=32, num_experts=256,
                                            num_experts_per_tok=8, moe_intermediate_size=512,
                                            shared_expert_intermediate_size=512),
                        dict(out_hidden_size=2048), False, "[P], [T], [O], [C]"),
    "qwen3.5-397b-a17b": ("qwen3_5_moe", dict(hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                                              num_key_value_heads=2, linear_num_value_heads=64, num_experts=512,
                                              num_experts_per_tok=10, moe_intermediate_size=1024,
                                              shared_expert_intermediate_size=1024),
                          dict(out_hidden_size=4096), False, "[O] only (not cross-checked)"),
}

# Qwen3-VL-30B-A3B: [V] the released Qwen/Qwen3-VL-30B-A3B-Instruct config.json (commit 1fc78ad) as transcribed into a
# public project's parser test (found by the search tool; every field below is in it), agreeing with a second public
# copy of the same config under another model_type, and with transformers 5.24's vision defaults
# (configuration_qwen3_vl_moe.py, documented as this checkpoint's; its text defaults are not this model's).
QWEN3_VL_MOE = {  # text sizes, vision sizes, tie_word_embeddings, sources
    "qwen3-vl-30b-a3b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                              moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                              rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=262144,
                              attention_bias=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 5000000,
                                               "mrope_interleaved": True, "mrope_section": [24, 20, 20]}),
                         dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                              patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                              deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
                         False, "[V]"),
}
EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def fused_transposed(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Per-expert linears' shapes -> each layer's experts as Qwen3-VL-MoE stores them: ``experts.gate_up_proj``
    [E, H, 2I] and ``experts.down_proj`` [E, I, H] (the transpose of transformers' fused runtime parameters)."""
    out, experts = {}, {}
    for key, shape in shapes.items():
        m = EXPERT_KEY.fullmatch(key)
        if m is None:
            out[key] = shape
            continue
        first = experts.setdefault(m[1], {"count": 0})
        first["count"] = max(first["count"], int(m[2]) + 1)
        first[m[3]] = shape
        if m[1] + ".gate_up_proj" not in out:  # keep the layer's place in the key order
            out[m[1] + ".gate_up_proj"] = out[m[1] + ".down_proj"] = None
    for prefix, e in experts.items():
        (inter, hidden), count = e["gate"], e["count"]
        if e["up"] != (inter, hidden) or e["down"] != (hidden, inter):
            raise ValueError(f"{prefix}: gate {e['gate']}, up {e['up']}, down {e['down']} are no SwiGLU expert")
        out[prefix + ".gate_up_proj"] = (count, hidden, 2 * inter)
        out[prefix + ".down_proj"] = (count, inter, hidden)
    return out


def real_config(shape: str, layers: int | None = None):
    """The released architecture's config, with the demo tokenizer's special-token ids; ``layers``: that many decoder
    layers (the config says so)."""
    from transformers import Qwen2VLConfig

    demo = json.loads((MODEL_DIR / "config.json").read_text())
    text = dict(SHAPES[shape], bos_token_id=demo["text_config"].get("bos_token_id", 0),
                eos_token_id=demo["text_config"].get("eos_token_id", 1), pad_token_id=0)
    tie = text.pop("tie_word_embeddings")
    if layers:
        text["num_hidden_layers"] = layers
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                               "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]}
    ids = {k: demo[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2VLConfig(text_config=text, vision_config=dict(VISION[shape], hidden_size=text["hidden_size"]),
                           tie_word_embeddings=tie, **ids)
    config.dtype = "bfloat16"
    return config


def qwen3_5_config(shape: str, layers: int | None = None, interval: int | None = None):
    """The released Qwen3.5 config of ``shape`` (``QWEN3_5``), with the demo tokenizer's special-token ids; ``layers``:
    that many decoder layers (the config says so), ``interval``: every interval-th of them full attention."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    model_type, sizes, vision, tie, _ = QWEN3_5[shape]
    demo = json.loads((MODEL_DIR / "config.json").read_text())
    text = dict(QWEN3_5_COMMON, **sizes, tie_word_embeddings=tie, bos_token_id=demo["text_config"].get("bos_token_id", 0),
                eos_token_id=demo["text_config"].get("eos_token_id", 1), pad_token_id=0)
    n = layers or text["num_hidden_layers"]
    every = interval or text.pop("full_attention_interval")
    text.pop("full_attention_interval", None)  # transformers derives layer_types from it; they are written out
    text.update(num_hidden_layers=n, layer_types=["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                                  for i in range(n)])
    ids = {k: demo[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    cls = Qwen3_5MoeConfig if model_type == "qwen3_5_moe" else Qwen3_5Config
    config = cls(text_config=text, vision_config=dict(QWEN3_5_VISION, **vision), tie_word_embeddings=tie, **ids)
    config.architectures = [cls.__name__.replace("Config", "ForConditionalGeneration")]
    config.dtype = "bfloat16"
    return config


def qwen3_vl_moe_config(shape: str, layers: int | None = None):
    """The released Qwen3-VL-MoE config of ``shape`` (``QWEN3_VL_MOE``), with the demo tokenizer's special-token ids;
    ``layers``: that many decoder layers (the config says so)."""
    from transformers import Qwen3VLMoeConfig

    sizes, vision, tie, _ = QWEN3_VL_MOE[shape]
    demo = json.loads((MODEL_DIR / "config.json").read_text())
    text = dict(sizes, tie_word_embeddings=tie, bos_token_id=demo["text_config"].get("bos_token_id", 0),
                eos_token_id=demo["text_config"].get("eos_token_id", 1), pad_token_id=0)
    text["num_hidden_layers"] = layers or text["num_hidden_layers"]
    ids = {k: demo[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    config.dtype = "bfloat16"
    return config


def mtp_shapes(config, family) -> dict[str, tuple[int, ...]]:
    """The MTP head's tensors as the released checkpoints carry them: ``mtp.fc`` [H, 2H], three norms and
    ``mtp_num_hidden_layers`` full-attention decoder layers (with the model's MLP: a MoE block, experts one tensor
    each), shaped from a one-layer meta skeleton."""
    import copy

    one = copy.deepcopy(config)
    one.text_config.num_hidden_layers = 1
    one.text_config.layer_types = ["full_attention"]
    bound = family.bind(one)
    layer = build_skeleton(one, bound, torch.bfloat16).get_submodule(bound.decoder_layers)[0]
    h = config.text_config.hidden_size
    out = {"mtp.fc.weight": (h, 2 * h)}
    out.update({f"mtp.{n}.weight": (h,) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")})
    for i in range(getattr(config.text_config, "mtp_num_hidden_layers", 0) or 0):
        out.update({f"mtp.layers.{i}.{k}": tuple(t.shape) for k, t in layer.state_dict().items()})
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02), in bf16; the same name always gives the same values."""
    if len(shape) == 1 and ("norm" in name or ".ln_" in name) and name.endswith(".weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_checkpoint(shape: str, output: pathlib.Path, max_shard_bytes: int = 5 * 2**30, layers: int | None = None,
                     interval: int | None = None) -> list[str]:
    if shape in QWEN3_5:
        config = qwen3_5_config(shape, layers, interval)
        family = family_for(config.model_type).bind(config)
    elif shape in QWEN3_VL_MOE:
        if interval:
            raise ValueError(f"--full-attention-interval: Qwen3.5 shapes only, not {shape}")
        config = qwen3_vl_moe_config(shape, layers)
        family = family_for(config.model_type).bind(config)
    else:
        if interval:
            raise ValueError(f"--full-attention-interval: Qwen3.5 shapes only, not {shape}")
        config, family = real_config(shape, layers), QWEN2_VL
    skeleton = build_skeleton(config, family, torch.bfloat16)
    names = [n for n in skeleton.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    shapes = {family.to_disk(n): tuple(t.shape) for n, t in skeleton.state_dict().items() if n in names}
    if shape in QWEN3_VL_MOE:
        shapes = fused_transposed(shapes)
    if shape in QWEN3_5:
        shapes.update(mtp_shapes(config, family_for(config.model_type)))
    entries = [(k, torch.bfloat16, s) for k, s in shapes.items()]
    output.mkdir(parents=True, exist_ok=False)
    shards = plan_shards(entries, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    seeds = {k: i for i, k in enumerate(shapes)}
    weight_map = {}
    for name, shard in zip(files, shards):
        write_safetensors(output / name, shard, lambda k: random_tensor(k, shapes[k], seeds[k]), {"format": "pt"})
        weight_map.update({e[0]: name for e in shard})
        print(f"wrote {name}", flush=True)
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    (output / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(output)
    for f in PROCESSOR_FILES:
        if (MODEL_DIR / f).exists():
            shutil.copy(MODEL_DIR / f, output / f)
    if shape in QWEN3_5 or shape in QWEN3_VL_MOE:  # the demo processor's pixels in the tower's patches
        processor = json.loads((output / "processor_config.json").read_text())
        patch = config.vision_config.patch_size
        for part in ("image_processor", "video_processor"):
            if part in processor:
                processor[part]["patch_size"] = patch
        (output / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["qwen2-vl-2b", "qwen2-vl-7b", *QWEN3_5, *QWEN3_VL_MOE], required=True)
    p.add_argument("--output", required=True, help="a new folder")
    p.add_argument("--layers", type=int, default=None,
                   help="write the first N decoder layers only (the config says N)")
    p.add_argument("--full-attention-interval", type=int, default=None,
                   help="Qwen3.5: every K-th layer full attention (default: the released 4)")
    args = p.parse_args()
    for name in ("layers", "full_attention_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    files = write_checkpoint(args.shape, pathlib.Path(args.output), layers=args.layers,
                             interval=args.full_attention_interval)
    print(f"{args.shape}: {len(files)} shard(s) in {args.output}")


if __name__ == "__main__":
    main()
