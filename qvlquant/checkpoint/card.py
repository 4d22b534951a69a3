"""The model card (``README.md``) every qvlquant export carries, built with huggingface_hub's ``ModelCard``.

The metadata are the hub's standard fields: ``base_model`` with ``base_model_relation: quantized`` (for a local base,
the hub id its config's ``_name_or_path`` or its own card's ``base_model`` records, when that looks like a hub id),
``license`` carried from the base's card, ``datasets`` (an ``hf:`` calibration source), ``library_name``,
``pipeline_tag`` and ``tags``. The body follows Qwen's and Red Hat's quantized cards: a short "Model overview" table
(architecture, method, weights, activations, the quantized modules in words, what stays unquantized, the stored format,
calibration data, the tool), then "Deployment" (what to install for the format, a chat-and-generate snippet that a test
runs against an export, vLLM), then "Evaluation" (the table when a report is given, else how to make one). How the
run quantized comes from the quantize report's config (its one owner: config.json's ``desc_act`` is false under
static groups although act-order ran); config.json gives the architecture and the stored format.
The card writes no links: a speculative link (a package index page that does not exist) is worse than none.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections import defaultdict

from huggingface_hub import ModelCard, ModelCardData

from qvlquant.checkpoint.qconfig import CheckpointQuant, read_quantization_config
from qvlquant.eval.check import task_scores
from qvlquant.families import FAMILIES
from qvlquant.quant.formats import Fp8Format, Int8Format, Nvfp4Format

CARD = "README.md"
# owner/name as the hub spells repository ids (no leading dot or dash, no "..")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What transformers needs to load each format (its quantizers' validate_environment, INTEROP.md); accelerate for
# the snippet's device_map="auto".
REQUIREMENTS = {
    "gptq": ("transformers", "accelerate", "optimum", "gptqmodel"),
    "awq": ("transformers", "accelerate", "gptqmodel"),
    "compressed-tensors": ("transformers", "accelerate", "compressed-tensors"),
    "fp8": ("transformers", "accelerate"),
}
# Where FP8 exports run as W8A8 (vLLM 0.33's FP8 linears and compressed-tensors' W8A8 scheme choose their kernels
# by compute capability; below 8.9 both fall back to FP8 Marlin, weight-only)
FP8_HARDWARE = ("an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) for FP8 W8A8 kernels; "
                "on older GPUs vLLM serves the FP8 weights through its Marlin kernel with 16-bit activations")
# Where INT8 W8A8 exports run (vLLM 0.33's CompressedTensorsW8A8Int8: get_min_capability 75, CUTLASS int8 scaled-mm)
W8A8_HARDWARE = ("an NVIDIA GPU with INT8 tensor cores (Ampere and newer; vLLM 0.33 accepts compute capability 7.5, "
                 "Turing, and up) for vLLM's CUTLASS int8 W8A8 kernels")
W8A8_METHOD = "INT8 W8A8 (W8A8), data-free round-to-nearest"
W8A8_ACTIVATIONS = "INT8, symmetric, dynamic: the serving kernel scales each token (absmax / 127) at run time"
# Where NVFP4A16 runs (vLLM 0.33's CompressedTensorsW4A4Fp4(use_a16=True), compute capability 7.5 or newer; its
# kernel by capability, asked of vLLM's own init_nvfp4_linear_kernel in tests/checkpoint/test_vllm_conformance.py)
NVFP4_HARDWARE = ("an NVIDIA GPU of compute capability 7.5 or newer; weight-only, so activations stay 16-bit "
                  "everywhere: vLLM 0.33 runs it with FlashInfer's CuTe-DSL W4A16 kernel on Blackwell sm_100, its "
                  "Humming kernel on Hopper (when installed) and Marlin's FP4 kernel on Turing, Ampere, Ada and "
                  "sm_120. Blackwell's native FP4 matmuls need FP4 activations too (the calibrated NVFP4 scheme)")
# Where NVFP4 W4A4 runs (vLLM 0.33's CompressedTensorsW4A4Fp4(use_a16=False); its kernel by capability, asked of
# vLLM's own init_nvfp4_linear_kernel in tests/checkpoint/test_vllm_conformance.py)
NVFP4_W4A4_HARDWARE = ("an NVIDIA Blackwell GPU (compute capability 10.x or 12.x, a CUDA 12.8+ build of vLLM) for "
                       "FP4 matmuls of FP4 activations (vLLM 0.33: FlashInfer's CUTLASS NVFP4 kernel); before "
                       "Blackwell vLLM serves the weights through a weight-only kernel (Marlin's FP4 on Turing, "
                       "Ampere and Ada, Humming on Hopper when installed) with 16-bit activations, as NVFP4A16")


def looks_like_hub_id(name) -> bool:
    """owner/name that is not an existing local path (a folder named like one is a folder)."""
    return (isinstance(name, str) and bool(HUB_ID.match(name)) and ".." not in name
            and not pathlib.Path(name).expanduser().exists())


def card_data(path: pathlib.Path) -> dict:
    """The metadata of the card at ``path`` (a README.md); {} when there is none or it does not parse."""
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a malformed card of someone else's model: no metadata to carry, not an error
        return {}


def cached_card(repo_id: str) -> pathlib.Path:
    """The base model's README.md as quantize downloaded it (the hub cache), without a network call."""
    from huggingface_hub import (
        try_to_load_from_cache,  # looked up at call time: tests replace it
    )

    try:
        found = try_to_load_from_cache(repo_id, CARD)
    except Exception:  # a malformed id or no cache: nothing to carry
        found = None
    return pathlib.Path(found) if isinstance(found, str) else pathlib.Path("/nonexistent") / CARD


def base_card(base: str) -> tuple[str | None, dict]:
    """-> (the base's hub id or None, the base's card metadata). A local base is named by the hub id its config's
    ``_name_or_path`` or its card's ``base_model`` records, when that looks like one."""
    folder = pathlib.Path(base).expanduser() if base else None
    if folder is not None and folder.is_dir():
        meta = card_data(folder / CARD)
        try:
            recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            recorded = None
        card_base = meta.get("base_model")
        card_base = card_base[0] if isinstance(card_base, list) and len(card_base) == 1 else card_base
        hub_id = next((c for c in (recorded, card_base) if looks_like_hub_id(c)), None)
        return hub_id, meta
    if looks_like_hub_id(base):
        return base, card_data(cached_card(base))
    return None, {}


def calibration_dataset(source) -> str | None:
    """The hub data set an ``hf:`` calibration source names (a local hf: path is no hub id)."""
    if isinstance(source, str) and source.startswith("hf:") and looks_like_hub_id(source[3:]):
        return source[3:]
    return None


def checkpoint_quant(config: dict) -> CheckpointQuant:
    """The export's quantization_config, through the one reader (``checkpoint.qconfig``)."""
    q = read_quantization_config(config.get("quantization_config"), "config.json")
    if q is None:
        raise ValueError("config.json has no quantization_config: not a quantized export, no card to write")
    return q


def metadata(config: dict, report: dict) -> ModelCardData:
    q = checkpoint_quant(config)
    hub_id, base_meta = base_card(str(report.get("base_model", "")))
    tags = ["qvlquant", q.method, f"{q.spec.bits}-bit", config.get("model_type", "qwen")]
    fields: dict = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": tags}
    if hub_id:
        fields.update(base_model=hub_id, base_model_relation="quantized")
    for key in ("license", "license_name", "license_link"):
        if base_meta.get(key):
            fields[key] = base_meta[key]
    dataset = calibration_dataset((report.get("calibration") or {}).get("source"))
    if dataset:
        fields["datasets"] = [dataset]
    return ModelCardData(**fields)


def run_settings(report: dict) -> dict:
    """How the run quantized (method, spec, act-order, ...): the quantize report's config; {} when not recorded."""
    return (report.get("config") or {}).get("quant") or {}


def gptq_rounds(quant: dict) -> bool:
    return quant.get("method") == "gptq" or (quant.get("method") == "awq" and quant.get("awq_rounding") == "gptq")


def method_text(method: str, quant: dict) -> str:
    """The method and the settings that shaped it, in words."""
    if method == "rtn":
        return "RTN (round-to-nearest)"
    if method == "awq":
        rounding = "GPTQ" if quant.get("awq_rounding") == "gptq" else "round-to-nearest"
        clip = ", clipping search" if quant.get("awq_clip") else ""
        return (f"AWQ, scale search over {quant['awq_grid']} grid points{clip}, {rounding} rounding"
                if "awq_grid" in quant else "AWQ")
    if method == "gptq" and quant:
        order = ", true-sequential" if quant.get("true_sequential") else ""
        mse = f", group ranges by an MSE search (norm {quant['mse']:g})" if quant.get("mse") else ""
        return f"GPTQ, damping {quant.get('damp_percent')}, block size {quant.get('block_size')}{order}{mse}"
    return method.upper()


def act_order_text(quant: dict) -> str:
    if not quant.get("desc_act"):
        return "no"
    return "yes" if quant.get("static_groups") else "yes, dynamic groups (g_idx)"


def weights_text(q: CheckpointQuant, quant: dict) -> str:
    """INT bits, the group size, symmetric or not: the run's spec, else the quantization_config's (FP8: e4m3 and
    its scale grid)."""
    if isinstance(q.pack_format, Fp8Format):
        grid = {Fp8Format.BLOCK: "128x128 blocks", Fp8Format.CHANNEL: "per output channel",
                Fp8Format.TENSOR: "per tensor (one scale shared by the linears vLLM fuses)"}[q.pack_format]
        return f"FP8, e4m3, {grid}, symmetric"
    if isinstance(q.pack_format, Int8Format):
        return "INT8, per output channel, symmetric (scale absmax / 127)"
    if isinstance(q.pack_format, Nvfp4Format):
        return "NVFP4, e2m1 in groups of 16 with e4m3 scales under a float32 global scale per tensor, symmetric"
    spec = quant.get("spec") or {"bits": q.spec.bits, "group_size": q.spec.group_size, "sym": q.spec.sym}
    group = spec.get("group_size")
    parts = [f"INT{spec.get('bits')}"]
    if group is not None:
        parts.append("per output channel" if group == -1 else f"groups of {group}")
    if spec.get("sym") is not None:
        parts.append("symmetric" if spec["sym"] else "asymmetric (zero points)")
    return ", ".join(parts)


STORED_AS = {"gptq": "GPTQ v1", "awq": "AWQ GEMM", "fp8": "block FP8, `weight` e4m3 + `weight_scale_inv`"}


def stored_text(q: CheckpointQuant) -> str:
    name = STORED_AS.get(q.method) or f"{q.method} {q.checkpoint_format}"
    return f"{name} (`quant_method: {q.method}`)"


def short_names(leaves: list[str]) -> str:
    """'self_attn.q_proj', 'self_attn.k_proj', 'mlp.up_proj' -> 'self_attn q/k_proj, mlp up_proj'."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for leaf in leaves:
        parent, _, name = leaf.rpartition(".")
        by_parent[parent].append(name)
    parts = []
    for parent, names in by_parent.items():
        suffix = "_proj" if len(names) > 1 and all(n.endswith("_proj") for n in names) else ""
        joined = "/".join(n.removesuffix(suffix) for n in names) + suffix
        parts.append(f"{parent} {joined}".strip())
    return ", ".join(parts)


def modules_text(report: dict, layer_count: int | None, model_type: str | None) -> str:
    """The quantized linears in words, from the report's per-linear records (a 72B's 560 names in one line), in
    the family's execution order."""
    names = list(report.get("layers") or {})
    per_layer: dict[int, set[str]] = defaultdict(set)
    for name in names:
        found = re.match(r"^.*?\.(\d+)\.(.+)$", name)  # PREFIX.LAYER.linear
        if found:
            per_layer[int(found.group(1))].add(found.group(2))
    if not per_layer:
        return "the linear layers of the language model's decoder layers"
    family = FAMILIES.get(model_type)
    order = list(family.linears) if family else []
    leaves = sorted(per_layer[min(per_layer)], key=lambda n: order.index(n) if n in order else len(order))
    if any(v != set(leaves) for v in per_layer.values()) or len(per_layer) != (layer_count or len(per_layer)):
        return f"{len(names)} linear layers in {len(per_layer)} decoder layers ({short_names(leaves)})"
    return (f"the {len(leaves)} linear layers of each of the {len(per_layer)} decoder layers "
            f"({short_names(leaves)}), {len(names)} in all")


def plan_text(plan: list[dict]) -> str:
    """The report's plan rows in words: each setting with its linears and bits per weight (scales included)."""
    weights = sum(r["weights"] for r in plan)
    average = sum(r["bits"] for r in plan) / max(1, weights)
    rows = [f"{r['setting']}: {r['linears']} linears ({r['bits_per_weight']:.2f} bits/weight)" for r in plan]
    return "; ".join(rows) + f"; {average:.2f} bits/weight on average (skipped linears in 16-bit)"


def calibration_text(report: dict, method: str) -> str:
    if method == "rtn":
        return "none: round-to-nearest uses the weights alone"
    calib = report.get("calibration")
    if method in ("fp8", "int8") and not calib:
        return "none: data-free, the weight scales come from the weights alone and activation scales per token"
    if method == "nvfp4" and not calib:
        return "none: data-free, the weight scales come from the weights alone"
    if not calib:
        return "not recorded"
    pixels = (report.get("config") or {}).get("processing", {}).get("max_pixels")
    bound = f", images bounded to {pixels} pixels" if pixels else ""
    tokens = f", {calib['tokens']} tokens" if calib.get("tokens") else ""
    used = " (for the activation scales only)" if method in ("fp8", "nvfp4") else ""
    return (f"{calib.get('num_samples')} samples from `{calib.get('source')}` (seed {calib.get('seed')})"
            f"{tokens}{bound}{used}")


def scheme_method_text(kind: str, report: dict) -> str:
    """"FP8 (FP8_DYNAMIC), data-free round-to-nearest"; a calibrated scheme says its activation scales are."""
    scheme = report.get("scheme")
    if not scheme:
        return kind
    if report.get("calibration"):
        return f"{kind} ({scheme}), round-to-nearest weights, activation scales from calibration"
    return f"{kind} ({scheme}), data-free round-to-nearest"


def w8a8_method_text(report: dict) -> str:
    """The data-free W8A8's line, or what the calibrated path did: SmoothQuant's strength and the rounding."""
    smoothing = report.get("smoothing")
    if not smoothing:
        return W8A8_METHOD
    return (f"INT8 W8A8 ({report.get('scheme')}), SmoothQuant (strength {smoothing.get('strength')}) and "
            f"{report.get('rounding')} on calibration data")


def fp8_method_text(report: dict) -> str:
    return scheme_method_text("FP8", report)


def nvfp4_method_text(report: dict) -> str:
    """NVFP4's line; W4A4 smoothed by SmoothQuant (groups folded) says so and with which strength."""
    smoothing = report.get("smoothing") or {}
    if smoothing.get("groups"):
        return (f"NVFP4 ({report.get('scheme')}), SmoothQuant (strength {smoothing.get('strength')}) then "
                "round-to-nearest weights, activation scales from calibration")
    return scheme_method_text("NVFP4", report)


def fp8_activations_text(fmt: Fp8Format) -> str:
    if fmt.static_activations:
        return "FP8 e4m3, static: one scale per linear (`input_scale`, from calibration), shared by the linears vLLM fuses"
    group = fmt.activation_group
    return ("FP8 e4m3, dynamic: the serving kernel scales each token" + (f" per group of {group} inputs" if group
                                                                         else "") + " at run time")


NVFP4_W4A4_ACTIVATIONS = ("NVFP4: e2m1 per 16 inputs, their e4m3 scales computed per token at run time under a "
                          "global scale from calibration (`input_global_scale`)")


def escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def overview(config: dict, report: dict) -> str:
    """The "Model overview" table: short rows in words."""
    q, quant = checkpoint_quant(config), run_settings(report)
    method = report.get("method") or quant.get("method") or q.method
    text = config.get("text_config") or config
    layers = text.get("num_hidden_layers")
    arch = ", ".join(config.get("architectures") or []) or "?"
    fp8 = q.pack_format if isinstance(q.pack_format, Fp8Format) else None
    int8 = isinstance(q.pack_format, Int8Format)
    fp4 = isinstance(q.pack_format, Nvfp4Format)
    rows = [("Architecture", f"{arch} (`{config.get('model_type', '?')}`)"
             + (f", {layers} decoder layers" if layers else "")),
            ("Quantization", fp8_method_text(report) if fp8 else w8a8_method_text(report) if int8 else nvfp4_method_text(report)
             if fp4 else method_text(method, quant)),
            ("Weights", weights_text(q, quant)),
            ("Activations", fp8_activations_text(fp8) if fp8 else W8A8_ACTIVATIONS if int8
             else NVFP4_W4A4_ACTIVATIONS if q.pack_format is Nvfp4Format.W4A4 else "not quantized (weight-only)")]
    if fp8 or int8 or fp4:
        rows.append(("Hardware", FP8_HARDWARE if fp8 else W8A8_HARDWARE if int8 else NVFP4_W4A4_HARDWARE
                     if q.pack_format is Nvfp4Format.W4A4 else NVFP4_HARDWARE))
    if gptq_rounds(quant):
        rows.append(("Act-order (static groups)", act_order_text(quant)))
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype")
    plan = report.get("plan") or []
    if len(plan) > 1:  # per-module rules: how many linears each setting got
        rows.append(("Per-module precision", plan_text(plan)))
    rows += [("Quantized modules", modules_text(report, layers, config.get("model_type"))),
             ("Kept unquantized", "the vision tower, the token embeddings and `lm_head`"
              + (f", in {dtype}" if dtype else "")),
             ("Stored as", stored_text(q)),
             ("Calibration data", calibration_text(report, method)),
             ("Tool", f"qvlquant {report.get('qvlquant_version', '')}".rstrip())]
    lines = ["| property | value |", "|---|---|"] + [f"| {k} | {escape_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def eval_table(eval_report: dict) -> str:
    """One row per model and task, the baseline first, of an eval report (``eval.check.validate_report``'s)."""
    rows = [eval_report["baseline"], eval_report] if eval_report.get("baseline") else [eval_report]
    lines = ["| model | task | accuracy % | n | held-out perplexity |", "|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        for task, accuracy in task_scores(r).items():
            lines.append(f"| {r.get('model', '?')} | {task} | {accuracy:.2f} | {r.get('n', '-')} | {ppl} |")
    return "\n".join(lines)


SNIPPET = '''\
```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{model_id}"
# "cpu" without a GPU: with "auto" there, gptqmodel 7.7 picks its Triton kernel, which needs CUDA
device_map = "auto" if torch.cuda.is_available() else "cpu"
model = AutoModelForImageTextToText.from_pretrained(model_id, device_map=device_map)
processor = AutoProcessor.from_pretrained(model_id)
messages = [{{"role": "user", "content": [
    {{"type": "image", "image": "example.jpg"}},  # a local path, file:// or data: URI, as calibration samples take
    {{"type": "text", "text": "Describe this image."}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def deployment(method: str, model_id: str) -> str:
    needs = REQUIREMENTS.get(method, ("transformers", "accelerate"))
    return (f"## Deployment\n\nWith transformers (`pip install {' '.join(needs)}`; a `device_map` needs "
            f"accelerate):\n\n{SNIPPET.format(model_id=model_id)}\n\nWith vLLM:\n\n```bash\nvllm serve {model_id}\n```")


NOT_EVALUATED = ("Not yet run: `qvlquant eval --model DIR --report eval.json`, then "
                 "`qvlquant push DIR --repo OWNER/NAME --eval eval.json` puts its table here, beside the base model's.")


def model_card(config: dict, report: dict, model_id: str, eval_report: dict | None = None) -> ModelCard:
    """The card of an export from its config.json and quantize report; ``model_id`` names it in the title and
    the snippets (the hub repo when pushed, the folder's name in the export)."""
    q = checkpoint_quant(config)
    method = report.get("method") or q.method
    base = report.get("base_model") or "an unrecorded base model"
    parts = [
        f"# {model_id.rstrip('/').split('/')[-1]}",
        f"`{base}` quantized by qvlquant with {method.upper()}: the language model's decoder linears hold "
        f"{weights_text(q, run_settings(report)).split(',')[0]} weights.",
        "## Model overview\n\n" + overview(config, report),
        deployment(q.method, model_id),
        "## Evaluation\n\n" + (("Measured with `qvlquant eval`:\n\n" + eval_table(eval_report)) if eval_report
                                else NOT_EVALUATED),
    ]
    body = "\n\n".join(parts) + "\n"
    return ModelCard(f"---\n{metadata(config, report).to_yaml()}\n---\n\n{body}")


def folder_card(folder: pathlib.Path, report: dict, model_id: str, eval_report: dict | None = None) -> str:
    """The card text for the export in ``folder`` (its config.json read from there)."""
    config = json.loads((pathlib.Path(folder) / "config.json").read_text())
    return str(model_card(config, report, model_id, eval_report))


def write_card(folder: pathlib.Path, report: dict, model_id: str) -> None:
    """``README.md`` of the export being written in ``folder`` (before its manifest, which lists it)."""
    (pathlib.Path(folder) / CARD).write_text(folder_card(folder, report, model_id), encoding="utf-8")
