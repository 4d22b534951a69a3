"""What a quantized checkpoint is, whether it still matches its manifest, whether vLLM's Marlin kernels can run it,
and whether transformers 5 keeps its vision tower in full precision; plus the repair for configs whose
``modules_to_not_convert`` does not protect it.

Reads config.json and the safetensors headers (names, shapes, dtypes); no weights are loaded, though verifying a
qvlquant export's manifest hashes every file. (Named ``inspection`` so that it does not shadow the stdlib ``inspect``.)

``repair_config`` changes nothing but ``modules_to_not_convert`` in config.json (names are only added), written
atomically. On a qvlquant export it first verifies the manifest (an edited or corrupted export is refused, so a repair
never hides it) and afterwards re-hashes the one entry of config.json, so the repaired export still verifies and
every other entry keeps its recorded hash. Folders without a manifest (the official releases) are repaired too.
"""

from __future__ import annotations

import json
import pathlib

from safetensors import safe_open
from transformers.quantizers.quantizers_utils import should_convert_module

from qvlquant.families import QWEN2_VL, ModelFamily, family_for
from qvlquant.manifest import (MANIFEST, ManifestError, atomic_write_text, is_pickle, read_manifest, update_entry,
                               verify_manifest)

MARLIN_GROUPS = (-1, 32, 64, 128)


def transformers_converts(runtime_name: str, patterns: list[str] | None) -> bool:
    """Whether transformers 5 replaces the module ``runtime_name`` by a quantized one, given ``patterns`` from
    ``modules_to_not_convert``: transformers' own matcher (``quantizers_utils.should_convert_module``), not a copy."""
    return should_convert_module(runtime_name, patterns or None)


def read_header(folder: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) for every tensor of the checkpoint."""
    index = folder / "model.safetensors.index.json"
    if not index.exists() and not (folder / "model.safetensors").exists():
        pickles = sorted(p.name for p in folder.iterdir() if is_pickle(p.name)) if folder.is_dir() else []
        found = f"it holds pickle weights {pickles}, which qvlquant never reads" if pickles else "it holds none"
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json ({found}); "
                                "qvlquant reads safetensors checkpoints only")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def marlin_problems(qc: dict, shapes: dict[str, tuple[int, int]], tp: int, family: ModelFamily = QWEN2_VL) -> list[str]:
    """Reasons vLLM's gptq_marlin / awq_marlin would refuse this checkpoint at tensor-parallel size ``tp``; which
    linears split along outputs or inputs comes from the family (``column_parallel`` / ``row_parallel``)."""
    method, bits, group = qc.get("quant_method"), int(qc.get("bits", qc.get("w_bit", 0))), int(qc.get("group_size", -1))
    problems = []
    if method == "gptq" and (bits, bool(qc.get("sym", True))) not in ((4, True), (8, True)):
        problems.append(f"gptq_marlin needs bits 4 or 8 with sym=true, got bits {bits}, sym {qc.get('sym')}")
    if method == "awq" and (bits != 4 or not qc.get("zero_point", True)):
        problems.append(f"awq_marlin needs 4-bit with zero_point, got bits {bits}")
    if group not in MARLIN_GROUPS:
        problems.append(f"group_size {group} not in {MARLIN_GROUPS}")
    for name, (k, n) in sorted(shapes.items()):
        row = any(name.endswith("." + p) for p in family.row_parallel)
        column = any(name.endswith("." + p) for p in family.column_parallel)
        k_shard, n_shard = (k // tp if row else k), (n // tp if column else n)
        split_ok = (not row or k % tp == 0) and (not column or n % tp == 0)
        if not split_ok or n_shard % 64 or k_shard % 128 or (group > 0 and k_shard % group):
            problems.append(f"{name}: per-shard in {k_shard} / out {n_shard} at tp={tp} (need out % 64, in % 128, in % group)")
    return problems


def verification(folder: pathlib.Path) -> dict:
    """{"status": "verified" | "failed" | "no manifest", "files": n listed, "error": why it failed or None}."""
    if not (folder / MANIFEST).exists():
        return {"status": "no manifest", "files": 0, "error": None}
    try:
        verify_manifest(folder)
        return {"status": "verified", "files": len(read_manifest(folder)), "error": None}
    except (ManifestError, OSError) as e:
        return {"status": "failed", "files": 0, "error": str(e)}


def inspect_checkpoint(folder: str | pathlib.Path) -> dict:
    """The report; ``verification`` says whether a qvlquant export still matches its manifest (the rest is read from
    the files as they are, so it is only trustworthy when that is "verified" or the folder is not ours)."""
    folder = pathlib.Path(folder)
    verified = verification(folder)
    config = json.loads((folder / "config.json").read_text())
    family = family_for(config.get("model_type", "?"))
    qc = config.get("quantization_config") or {}
    header = read_header(folder)
    shapes = {}
    for key, (shape, _) in header.items():
        if key.endswith(".qweight"):
            module = key[: -len(".qweight")]
            n = header[module + ".scales"][0][1]
            k = shape[0] * 32 // int(qc.get("bits", 4)) if qc.get("quant_method") == "gptq" else shape[0]
            shapes[family.to_runtime(module + ".")[:-1]] = (k, n)
    plain = sorted(family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                   if k.endswith(".weight") and len(s) == 2)
    vision = [m for m in plain if m.startswith(family.vision_tower + ".")]
    patterns = qc.get("modules_to_not_convert")
    exposed = [m for m in vision if transformers_converts(m, patterns)] if qc.get("quant_method") == "awq" else []
    return {
        "folder": str(folder),
        "verification": verified,
        "model_type": config.get("model_type"),
        "quantization": {k: qc.get(k) for k in ("quant_method", "bits", "group_size", "sym", "zero_point", "desc_act", "version") if k in qc},
        "quantized_linears": len(shapes),
        "unquantized_linears": len(plain),
        "vision_linears": len(vision),
        "vision_exposed_in_transformers": exposed,
        "marlin": {tp: marlin_problems(qc, shapes, tp, family) for tp in (1, 2, 4, 8)} if shapes else {},
    }


def repair_config(folder: str | pathlib.Path) -> list[str]:
    """Make ``modules_to_not_convert`` name every unquantized part in both layouts (see the module docstring for what
    is written). -> the list written."""
    folder = pathlib.Path(folder)
    ours = (folder / MANIFEST).exists()
    if ours:
        try:
            verify_manifest(folder)
        except (ManifestError, OSError) as e:
            raise ValueError(f"not repairing {folder}: the export fails verification ({e}); re-export it") from None
    path = folder / "config.json"
    config = json.loads(path.read_text())
    family = family_for(config.get("model_type", "?"))
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(f"{folder} is not quantized: nothing to repair")
    names = list(dict.fromkeys(list(qc.get("modules_to_not_convert") or []) + family.unquantized_disk_names()))
    if names == qc.get("modules_to_not_convert"):
        return names  # already right: nothing is rewritten
    qc["modules_to_not_convert"] = names
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    if ours and "config.json" in read_manifest(folder):
        update_entry(folder, "config.json")
    return names
