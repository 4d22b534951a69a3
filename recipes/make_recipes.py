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
"""

import pathlib

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


if __name__ == "__main__":
    main()
