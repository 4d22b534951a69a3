"""The model card (``README.md``) every qvlquant export carries, built with huggingface_hub's ``ModelCard``.

The metadata are the hub's standard fields: ``base_model`` with ``base_model_relation: quantized`` (for a local base,
the hub id its config's ``_name_or_path`` or its own card's ``base_model`` records, when that looks like a hub id),
``license`` carried from the base's card, ``datasets`` (an ``hf:`` calibration source), ``library_name``,
``pipeline_tag`` and ``tags``. The body: the settings as a table, the calibration data, the evaluation when one is
given, what to install for the export's format, and a chat-and-generate snippet (a test runs it against an export).
The card writes no links: a speculative link (a package index page that does not exist) is worse than none.
"""

from __future__ import annotations

import json
import pathlib
import re

from huggingface_hub import ModelCard, ModelCardData

from qvlquant.eval.check import task_scores

CARD = "README.md"
# owner/name as the hub spells repository ids (no leading dot or dash, no "..")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What transformers needs to load each format (its quantizers' validate_environment, INTEROP.md); accelerate for
# the snippet's device_map="auto".
REQUIREMENTS = {
    "gptq": ("transformers", "accelerate", "optimum", "gptqmodel"),
    "awq": ("transformers", "accelerate", "gptqmodel"),
    "compressed-tensors": ("transformers", "accelerate", "compressed-tensors"),
}


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


def metadata(config: dict, report: dict) -> ModelCardData:
    qc = config["quantization_config"]
    hub_id, base_meta = base_card(str(report.get("base_model", "")))
    method = qc.get("quant_method", "quantized")
    tags = ["qvlquant", method, f"{weight_bits(qc)}-bit", config.get("model_type", "qwen")]
    fields: dict = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": tags}
    if hub_id:
        fields.update(base_model=hub_id, base_model_relation="quantized")
    for key in ("license", "license_name", "license_link"):
        if base_meta.get(key):
            fields[key] = base_meta[key]
    dataset = calibration_dataset(report.get("calibration", {}).get("source"))
    if dataset:
        fields["datasets"] = [dataset]
    return ModelCardData(**fields)


def weight_bits(qc: dict):
    groups = qc.get("config_groups") or {}
    return qc.get("bits") or next(iter(groups.values()), {}).get("weights", {}).get("num_bits")


def cell(value) -> str:
    """A setting as a table cell: JSON spelling (true, null), lists comma-separated, groups of a list of lists
    separated by ' / ', '|' escaped."""
    if isinstance(value, list):
        sep = " / " if any(isinstance(v, list) for v in value) else ", "
        text = sep.join(cell(v) for v in value) if value else "(none)"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    return text.replace("|", "\\|")


def flat_settings(qc: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of the quantization_config, nested dicts (compressed-tensors groups) flattened; the
    quantizer's ``meta`` left out (the report records it)."""
    rows = []
    for key, value in qc.items():
        if key == "meta" and not prefix:
            continue
        if isinstance(value, dict):
            rows += flat_settings(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def settings_table(qc: dict) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | {cell(value)} |" for key, value in flat_settings(qc)]
    return "\n".join(lines)


def calibration_text(report: dict) -> str:
    calib = report.get("calibration")
    if not calib:
        return "Not recorded."
    pixels = (report.get("config") or {}).get("calib", {}).get("max_pixels")
    bound = f", images bounded to {pixels} pixels" if pixels else ""
    return (f"{calib.get('num_samples')} samples from `{calib.get('source')}` (seed {calib.get('seed')}), "
            f"{calib.get('tokens')} tokens{bound}.")


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
    {{"type": "image", "path": "example.jpg"}},  # any local image file
    {{"type": "text", "text": "Describe this image."}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def usage(method: str, model_id: str) -> str:
    needs = REQUIREMENTS.get(method, ("transformers", "accelerate"))
    return (f"## Usage\n\nWith transformers (`pip install {' '.join(needs)}`; a `device_map` needs "
            f"accelerate):\n\n{SNIPPET.format(model_id=model_id)}\n\nWith vLLM:\n\n```bash\nvllm serve {model_id}\n```")


def model_card(config: dict, report: dict, model_id: str, eval_report: dict | None = None) -> ModelCard:
    """The card of an export from its config.json and quantize report; ``model_id`` names it in the title and
    the snippets (the hub repo when pushed, the folder's name in the export)."""
    qc = config["quantization_config"]
    method = qc.get("quant_method", "quantized")
    base = report.get("base_model") or "an unrecorded base model"
    parts = [
        f"# {model_id.rstrip('/').split('/')[-1]}",
        f"Quantized with qvlquant {report.get('qvlquant_version', '')}".rstrip() + f" from `{base}`: method "
        f"**{report.get('method', method)}**, stored as **{method}**; the vision tower and `lm_head` stay in full "
        "precision.",
        "## Quantization settings\n\n" + settings_table(qc),
        "## Calibration data\n\n" + calibration_text(report),
    ]
    if eval_report:
        parts.append("## Evaluation (measured with `qvlquant eval`)\n\n" + eval_table(eval_report))
    parts.append(usage(method, model_id))
    body = "\n\n".join(parts) + "\n"
    return ModelCard(f"---\n{metadata(config, report).to_yaml()}\n---\n\n{body}")


def folder_card(folder: pathlib.Path, report: dict, model_id: str, eval_report: dict | None = None) -> str:
    """The card text for the export in ``folder`` (its config.json read from there)."""
    config = json.loads((pathlib.Path(folder) / "config.json").read_text())
    return str(model_card(config, report, model_id, eval_report))


def write_card(folder: pathlib.Path, report: dict, model_id: str) -> None:
    """``README.md`` of the export being written in ``folder`` (before its manifest, which lists it)."""
    (pathlib.Path(folder) / CARD).write_text(folder_card(folder, report, model_id), encoding="utf-8")
