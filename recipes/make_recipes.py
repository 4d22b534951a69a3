"""Writes recipes/*.yaml: the settings of each published Qwen VL quantized checkpoint, as released with them (the
``quantization_config`` in each checkpoint's config.json on the Hugging Face Hub, e.g.
Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int4, and the Qwen2-VL README, https://github.com/QwenLM/Qwen2-VL).

    python recipes/make_recipes.py

GPTQ (Int4 / Int8): bits 4 or 8, group_size 128, damp_percent 0.1, desc_act false, static_groups false, sym true,
true_sequential true, 20 calibration conversations (image captioning). AWQ: 4-bit, group_size 128, zero point, GEMM,
AWQ's own clipping search and round-to-nearest (awq_rounding rtn),
8 calibration conversations. The 72B models zero-pad the MLP (29568 -> 29696) so they split across 2/4/8 GPUs.
FP8 (Qwen3-VL, as Qwen/Qwen3-VL-8B-Instruct-FP8 and its siblings): ``quant_method: fp8``, e4m3 weights in 128x128
blocks, dynamic activations, the vision tower and lm_head unquantized: ``scheme: FP8_BLOCK``, data-free.

Qwen3.5 / Qwen3.6 (``qwen3_5``, ``qwen3_5_moe``) and Qwen3-VL-MoE (``qwen3_vl_moe``): PUBLISHED below, one entry per
checkpoint whose settings public material states, each with its sources and what was read and what inferred written
into the recipe. Their GPTQ-Int4 checkpoints keep every attention linear (and the MoE's shared expert) in BF16:
``rules`` skipping them. Checkpoints whose settings were not found have no recipe (left out, not guessed).
"""

import pathlib
import textwrap

MODELS = {
    "Qwen2-VL": ["2B", "7B", "72B"],
    "Qwen2.5-VL": ["3B", "7B", "72B"],
    "Qwen3-VL": ["2B", "4B", "8B", "32B"],
}
NOTES = {
    "Qwen2-VL": "Reproduces the published Qwen/{name}-{suffix} settings.",
    "Qwen2.5-VL": "Qwen published AWQ checkpoints of Qwen2.5-VL; GPTQ recipes apply the Qwen2-VL GPTQ settings.",
    "Qwen3-VL": "Qwen published FP8 checkpoints of Qwen3-VL, not GPTQ/AWQ: these apply the Qwen2-VL settings.",
}
METHODS = {
    "GPTQ-Int4": dict(method="gptq", bits=4, group_size=128, sym=True, desc_act=False, static_groups=False,
                      true_sequential=True, damp_percent=0.1, num_samples=20),
    "GPTQ-Int8": dict(method="gptq", bits=8, group_size=128, sym=True, desc_act=False, static_groups=False,
                      true_sequential=True, damp_percent=0.1, num_samples=20),
    "AWQ": dict(method="awq", bits=4, group_size=128, sym=False, awq_rounding="rtn", num_samples=8),
}


# GPTQModel's ``dynamic`` map of Qwen's Qwen3.5 GPTQ-Int4 checkpoints ("-:" = not quantized), as public code quotes
# their config.json; lm_head and embed_tokens are listed too. Only the MLPs / routed experts are quantized.
GPTQ_DYNAMIC = '{"-:.*attn.*", "-:.*shared_expert.*", "-:.*mtp.*", "-:.*visual.*"}'
ATTENTION_RULES = [r"linear_attn\.", r"self_attn\."]  # `-:.*attn.*`: the Gated DeltaNet's and the gated attention's
GPTQ_INT4 = dict(method="gptq", bits=4, group_size=128, sym=True, desc_act=False)
NOT_READ = ("Not in what was read, so qvlquant's defaults apply: damp_percent, true_sequential, static_groups, the "
            "calibration set and its size.")
FP8_DIFFERS = ("Differs: Qwen keeps linear_attn.in_proj_a / in_proj_b in BF16; qvlquant's FP8_BLOCK quantizes them "
               "too (a data-free scheme takes no rules).")
QWEN3_VL_FP8 = ("Inferred from the dense Qwen3-VL FP8 checkpoints (qwen3-vl-*-instruct-fp8.yaml): e4m3 weights, "
                "dynamic activations, vision tower and lm_head unquantized. qvlquant keeps the router (mlp.gate) and "
                "writes each expert's gate / up / down as its own FP8 linear.")
PUBLISHED = {  # file stem -> (comment lines, settings); the sources are in the comments
    "qwen3.5-27b-gptq-int4": ([
        "Qwen3.5-27B GPTQ-Int4 (qwen3_5): the settings of Qwen/Qwen3.5-27B-GPTQ-Int4.",
        "Read (its config.json quantization_config, as public code quotes it): gptq, bits 4, group_size 128, sym true, "
        f"desc_act false, dynamic {GPTQ_DYNAMIC}: only the MLPs are quantized; every Gated DeltaNet (linear_attn) "
        "and gated attention (self_attn) linear stays BF16, hence the rules. qvlquant never quantizes the MTP head, "
        "the vision tower, embeddings or lm_head.",
        NOT_READ,
        "Sources: https://huggingface.co/Qwen/Qwen3.5-27B-GPTQ-Int4 ; https://github.com/onnxruntime/mobius/pull/18 "
        "(\"Official Qwen3.5-27B-GPTQ-Int4 excludes attention\"); an SGLang XPU porting note quoting the "
        "quantization_config of both Qwen3.5 GPTQ-Int4 checkpoints (27B, 35B-A3B).",
        "Calibration: pass --calib with your conversations (JSON/JSONL).",
    ], dict(model="Qwen/Qwen3.5-27B", **GPTQ_INT4, rules=ATTENTION_RULES)),
    "qwen3.5-35b-a3b-gptq-int4": ([
        "Qwen3.5-35B-A3B GPTQ-Int4 (qwen3_5_moe): the settings of Qwen/Qwen3.5-35B-A3B-GPTQ-Int4.",
        "Read (its config.json quantization_config, as public code quotes it): gptq, bits 4, group_size 128, sym true, "
        f"desc_act false, dynamic {GPTQ_DYNAMIC}: only the routed experts are quantized; the attention linears "
        "(linear_attn, self_attn) and the shared expert stay BF16, hence the rules. qvlquant keeps the routers "
        "(mlp.gate, mlp.shared_expert_gate) and never quantizes the MTP head, vision tower, embeddings or lm_head.",
        NOT_READ + " Experts the calibration set reaches rarely: qvlquant's --min-expert-tokens / --rare-experts.",
        "Sources: https://huggingface.co/Qwen/Qwen3.5-35B-A3B-GPTQ-Int4 ; an SGLang XPU porting note quoting the "
        "quantization_config of both Qwen3.5 GPTQ-Int4 checkpoints; an SGLang GPTQ test pinning \"the dynamic map "
        "both MoE checkpoints ship\" (35B-A3B, 122B-A10B).",
        "Calibration: pass --calib with your conversations (JSON/JSONL).",
    ], dict(model="Qwen/Qwen3.5-35B-A3B", **GPTQ_INT4, rules=ATTENTION_RULES + [r"shared_expert\."])),
    "qwen3.5-27b-fp8": ([
        "Qwen3.5-27B FP8 (qwen3_5): Qwen/Qwen3.5-27B-FP8 as FP8_BLOCK, data-free (no calibration).",
        "Read: quant_method fp8, activation_scheme dynamic, weight_block_size [128, 128] (a public survey of the "
        "Qwen3.5 configs); weight_scale_inv beside linear_attn in_proj_qkv / in_proj_z / out_proj, self_attn and the "
        "MLPs, none listed beside in_proj_a / in_proj_b (the checkpoint's tensor list, "
        "https://github.com/jundot/omlx/issues/190).",
        FP8_DIFFERS + " qvlquant copies the MTP head unchanged.",
        "Source: https://huggingface.co/Qwen/Qwen3.5-27B-FP8",
    ], dict(model="Qwen/Qwen3.5-27B", scheme="FP8_BLOCK")),
    "qwen3.6-27b-fp8": ([
        "Qwen3.6-27B FP8 (qwen3_5): Qwen/Qwen3.6-27B-FP8 as FP8_BLOCK, data-free (no calibration).",
        "Read: quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size [128, 128], vision blocks not "
        "converted (a public survey of the Qwen3.5 / 3.6 configs). Inferred from Qwen3.5-27B-FP8 and "
        "Qwen3.6-35B-A3B-FP8: which decoder linears stay BF16.",
        FP8_DIFFERS + " qvlquant copies the MTP head unchanged.",
        "Source: https://huggingface.co/Qwen/Qwen3.6-27B-FP8",
    ], dict(model="Qwen/Qwen3.6-27B", scheme="FP8_BLOCK")),
    "qwen3.5-35b-a3b-fp8": ([
        "Qwen3.5-35B-A3B FP8 (qwen3_5_moe): Qwen/Qwen3.5-35B-A3B-FP8 as FP8_BLOCK, data-free (no calibration).",
        "Read: quant_method fp8, activation_scheme dynamic, weight_block_size [128, 128] (a public survey of the "
        "Qwen3.5 configs); kept BF16: embeddings, lm_head, routers (gate, shared_expert_gate), conv1d, in_proj_ba, "
        "norms, so attention, shared expert and experts are FP8 (MaxText's qwen3.5-35b-a3b-fp8.yml, \"matching official "
        "Hugging Face quantization configs\", https://github.com/AI-Hypercomputer/maxtext/pull/5076).",
        FP8_DIFFERS + " The MTP head qvlquant copies unchanged; whether Qwen's FP8 quantizes it was not read.",
        "Source: https://huggingface.co/Qwen/Qwen3.5-35B-A3B-FP8",
    ], dict(model="Qwen/Qwen3.5-35B-A3B", scheme="FP8_BLOCK")),
    "qwen3.6-35b-a3b-fp8": ([
        "Qwen3.6-35B-A3B FP8 (qwen3_5_moe): Qwen/Qwen3.6-35B-A3B-FP8 as FP8_BLOCK, data-free (no calibration).",
        "Read: quant_method fp8, fmt e4m3, activation_scheme dynamic (read out of the checkpoint, "
        "https://github.com/0xBakeer/inference-atlas/pull/145); weight_block_size [128, 128], experts stored one "
        "linear each, kept BF16: lm_head, embed_tokens, norms, linear_attn A_log / conv1d / dt_bias / in_proj_a / "
        "in_proj_b (a card transcribing the official layout, https://friendli.ai/models/gsting/"
        "Qwen3.6-35B-A3B-abliterated-FP8); 250 non-expert FP8 scales = attention + shared experts "
        "(https://github.com/ml-explore/mlx-lm/pull/1224).",
        FP8_DIFFERS + " Inferred: Qwen's FP8 quantizes the MTP head (1,560 tensors there against 785 in BF16 "
        "releases); qvlquant copies it unchanged (BF16).",
        "Source: https://huggingface.co/Qwen/Qwen3.6-35B-A3B-FP8",
    ], dict(model="Qwen/Qwen3.6-35B-A3B", scheme="FP8_BLOCK")),
    "qwen3.5-397b-a17b-fp8": ([
        "Qwen3.5-397B-A17B FP8 (qwen3_5_moe): Qwen/Qwen3.5-397B-A17B-FP8 as FP8_BLOCK, data-free (no calibration).",
        "Read: e4m3 weights in blocks of 128; kept BF16: embeddings, lm_head, routers (gate, shared_expert_gate), "
        "conv1d, in_proj_ba, norms (MaxText's qwen3.5-397b-a17b-fp8.yml, \"matching official Hugging Face "
        "quantization configs\", config-only there, https://github.com/AI-Hypercomputer/maxtext/pull/5076). "
        "Inferred from its Qwen3.5 siblings: dynamic activations.",
        FP8_DIFFERS + " The MTP head qvlquant copies unchanged; whether Qwen's FP8 quantizes it was not read.",
        "Source: https://huggingface.co/Qwen/Qwen3.5-397B-A17B-FP8",
    ], dict(model="Qwen/Qwen3.5-397B-A17B", scheme="FP8_BLOCK")),
    "qwen3-vl-235b-a22b-thinking-fp8": ([
        "Qwen3-VL-235B-A22B-Thinking FP8 (qwen3_vl_moe): Qwen/Qwen3-VL-235B-A22B-Thinking-FP8 as FP8_BLOCK, "
        "data-free.",
        "Read (model card): \"fine-grained fp8 quantization with block size of 128\". " + QWEN3_VL_FP8,
        "Source: https://huggingface.co/Qwen/Qwen3-VL-235B-A22B-Thinking-FP8",
    ], dict(model="Qwen/Qwen3-VL-235B-A22B-Thinking", scheme="FP8_BLOCK")),
    "qwen3-vl-30b-a3b-thinking-fp8": ([
        "Qwen3-VL-30B-A3B-Thinking FP8 (qwen3_vl_moe): Qwen/Qwen3-VL-30B-A3B-Thinking-FP8 as FP8_BLOCK, data-free.",
        "Read (its model card as a translated repost quotes it, http://www.nshx.cn/game/33813.html): fine-grained FP8 "
        "with block size 128. " + QWEN3_VL_FP8,
        "Source: https://huggingface.co/Qwen/Qwen3-VL-30B-A3B-Thinking-FP8",
    ], dict(model="Qwen/Qwen3-VL-30B-A3B-Thinking", scheme="FP8_BLOCK")),
}


def published_recipe(notes: list[str], settings: dict) -> str:
    """A PUBLISHED entry as YAML: its notes as comment lines of at most 118 characters, then the settings (rules as
    one flow mapping per skipped pattern)."""
    lines = [f"# {line}" for note in notes for line in textwrap.wrap(note, 116, break_on_hyphens=False)]
    for key, value in settings.items():
        if key == "rules":
            lines += ["rules:"] + [f"  - {{pattern: '{pattern}', skip: true}}" for pattern in value]
        else:
            lines.append(f"{key}: {yaml_value(value)}")
    return "\n".join(lines) + "\n"


def yaml_value(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


def main():
    here = pathlib.Path(__file__).parent
    for family, sizes in MODELS.items():
        for size in sizes:
            name = f"{family}-{size}-Instruct"
            for suffix, settings in METHODS.items():
                lines = [f"# {name} {suffix}. {NOTES[family].format(name=name, suffix=suffix)}",
                         "# Calibration: pass --calib with your image-captioning conversations (JSON/JSONL).",
                         f"model: Qwen/{name}"]
                lines += [f"{k}: {yaml_value(v)}" for k, v in settings.items()]
                if size == "72B":
                    lines.append("pad_intermediate_to: 1024  # 29568 -> 29696: splits across 2/4/8 GPUs with group 128")
                (here / f"{name.lower()}-{suffix.lower()}.yaml").write_text("\n".join(lines) + "\n")
    for size in MODELS["Qwen3-VL"]:
        name = f"Qwen3-VL-{size}-Instruct"
        lines = [f"# {name} FP8. Reproduces the published Qwen/{name}-FP8 settings: e4m3 weights in 128x128 blocks,",
                 "# dynamic FP8 activations, the vision tower and lm_head unquantized. Data-free: no calibration.",
                 f"model: Qwen/{name}", "scheme: FP8_BLOCK"]
        (here / f"{name.lower()}-fp8.yaml").write_text("\n".join(lines) + "\n")
    demo_fp8 = ["# The embedded demo model in Qwen's block FP8 (data-free, seconds).", "model: demo",
                "scheme: FP8_BLOCK", "check:  # qvlquant check --recipe: W8A8 FP8 is within the noise of BF16",
                "  max_drop:", "    easyvqa: 1.0", "  max_ppl_increase: 1.0"]
    (here / "demo-fp8-block.yaml").write_text("\n".join(demo_fp8) + "\n")
    demo = ["# The embedded demo model, GPTQ Int4 as the published Qwen2-VL settings (runs offline in ~30 s).",
            "model: demo", "calib: demo"] + [f"{k}: {yaml_value(v)}" for k, v in METHODS["GPTQ-Int4"].items() if k != "num_samples"]
    check = ["check:  # qvlquant check --recipe: what this quantization may cost against BF16", "  max_drop:",
             "    easyvqa: 1.0", "  max_ppl_increase: 2.0"]
    (here / "demo-gptq-int4.yaml").write_text("\n".join(demo + ["num_samples: 32"] + check) + "\n")
    for stem, (notes, settings) in PUBLISHED.items():
        (here / f"{stem}.yaml").write_text(published_recipe(notes, settings))


if __name__ == "__main__":
    main()
