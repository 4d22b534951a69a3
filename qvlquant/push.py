"""``qvlquant push``: a verified export to the Hugging Face hub, in one commit, with a generated model card.

Only the files the export wrote (its sha256 manifest lists them) plus the model card are sent. An export that fails
verification sends nothing. The token (HF_TOKEN or the cached login) is handed to the hub client and appears nowhere
else: not in output, logs, saved files or exception text.
"""

from __future__ import annotations

import json
import os
import pathlib

from qvlquant.export import REPORT
from qvlquant.manifest import MANIFEST, is_pickle, read_manifest, verify_manifest


class PushError(RuntimeError):
    pass


def files_to_push(folder: pathlib.Path) -> list[str]:
    """The export's own files, after verifying them (manifest hashes, quantized config, index shards)."""
    if not (folder / MANIFEST).exists():
        raise PushError(f"{folder} has no {MANIFEST}: push only pushes qvlquant exports (re-export, or verify by hand)")
    verify_manifest(folder)
    config = json.loads((folder / "config.json").read_text())
    if not config.get("quantization_config"):
        raise PushError(f"{folder}/config.json has no quantization_config: not a quantized export")
    listed = read_manifest(folder)  # verified above: plain file names inside the export only
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(f for f in shards if f not in listed)
        if missing:
            raise PushError(f"{folder}: shards {missing} named in the index are not files of the export "
                            f"(missing, or not in {MANIFEST}); re-export the model")
    names = sorted(listed) + [MANIFEST]
    bad = [n for n in names if is_pickle(n)]
    if bad:
        raise PushError(f"{folder}: pickle files {bad} are never pushed (safetensors only); re-export the model")
    return names


def _front_matter(readme: pathlib.Path) -> dict:
    import yaml

    if not readme.exists():
        return {}
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    try:
        return yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}


def _cached_readme(repo_id: str) -> pathlib.Path:
    """The base model's README.md as quantize downloaded it (the hub cache), without a network call."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "README.md")
    except Exception:  # a malformed id or no cache: no license to carry
        found = None
    return pathlib.Path(found) if isinstance(found, str) else pathlib.Path("/nonexistent/README.md")


def _eval_table(report: dict) -> str:
    rows = [report.get("baseline"), report] if report.get("baseline") else [report]
    lines = ["| model | task | accuracy % | n | held-out perplexity |", "|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        lines.append(f"| {r.get('model', '?')} | {r['task']} | {r['accuracy']:.2f} | {r['n']} | {ppl} |")
    return "\n".join(lines)


def model_card(folder: pathlib.Path, repo_id: str, eval_report: dict | None = None) -> str:
    import yaml

    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).exists() else {}
    base = str(report.get("base_model", ""))
    bits = qc.get("bits") or next(iter(qc.get("config_groups", {}).values()), {}).get("weights", {}).get("num_bits")
    meta: dict = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
                  "tags": ["qvlquant", qc.get("quant_method", "quantized"), f"{bits}-bit", config.get("model_type", "qwen")]}
    base_meta = {}
    if base and pathlib.Path(base).is_dir():
        base_meta = _front_matter(pathlib.Path(base) / "README.md")
    elif base and base != "demo" and base.count("/") == 1:
        meta["base_model"] = base
        base_meta = _front_matter(_cached_readme(base))
    if base_meta.get("license"):
        meta["license"] = base_meta["license"]
    arch = (config.get("architectures") or ["AutoModelForImageTextToText"])[0]
    calib = report.get("calibration", {})
    settings = "\n".join(f"- `{k}`: `{v}`" for k, v in qc.items() if k not in ("meta",))
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=True) + "---",
        f"# {repo_id.split('/')[-1]}",
        f"Quantized with [qvlquant](https://pypi.org/project/qvlquant/) from `{base or 'an unrecorded base model'}`: "
        f"method **{report.get('method', qc.get('quant_method'))}**; the vision tower and `lm_head` stay in full precision.",
        "## Quantization settings\n" + settings,
        "## Calibration data\n" + (f"{calib.get('num_samples')} samples from `{calib.get('source')}` (seed {calib.get('seed')}), "
                                   f"{calib.get('tokens')} tokens, images bounded to {calib.get('max_pixels')} pixels."
                                   if calib else "Not recorded."),
    ]
    if eval_report:
        parts.append("## Evaluation (measured with `qvlquant eval`)\n" + _eval_table(eval_report))
    parts.append(
        "## Usage\n\ntransformers (needs `gptqmodel`, plus `optimum` for GPTQ):\n\n```python\n"
        f"from transformers import {arch}, AutoProcessor\n\n"
        f"model = {arch}.from_pretrained(\"{repo_id}\", device_map=\"auto\")\n"
        f"processor = AutoProcessor.from_pretrained(\"{repo_id}\")\n```\n\n"
        f"vLLM:\n\n```bash\nvllm serve {repo_id}\n```"
    )
    return "\n\n".join(parts) + "\n"


def resolve_token() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no cached login is not an error here
        return None


def push(folder, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
         eval_report: dict | None = None, api=None) -> dict:
    """-> {"repo", "files", "revision", "dry_run"}; raises PushError without the token in its text."""
    folder = pathlib.Path(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo {repo_id!r}: expected owner/name")
    try:
        names = files_to_push(folder)
    except (ValueError, FileNotFoundError) as e:
        raise PushError(f"export verification failed, nothing pushed: {e}") from None
    card = model_card(folder, repo_id, eval_report)
    plan = {"repo": repo_id, "files": names + ["README.md"], "revision": revision or "main", "dry_run": dry_run}
    if dry_run:
        return plan
    token = resolve_token()
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = api or HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in names]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        api.create_commit(repo_id, operations=ops, commit_message=f"qvlquant export ({len(names)} files + model card)",
                          revision=revision)
    except Exception as e:  # the hub client raises many types; re-raise one, scrubbed of the token
        message = f"{type(e).__name__}: {e}"
        if token:
            message = message.replace(token, "***")
        raise PushError(f"push to {repo_id} failed: {message}") from None
    return plan
