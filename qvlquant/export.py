"""Writing quantized checkpoints: safetensors in the keys ``save_pretrained`` writes, a ``quantization_config`` the
loaders read, the processor without any truncation setting, a report, and a sha256 manifest.

Everything is written into a temporary folder beside the output and renamed into place at the end, so a crash never
leaves a partial model and never destroys the model that was there before.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil

import torch
from safetensors.torch import save_file

from qvlquant import __version__
from qvlquant.families import ModelFamily
from qvlquant.manifest import MANIFEST, sha256, verify_manifest, write_manifest  # noqa: F401 (re-exported)
from qvlquant.outputs import replace_dir
from qvlquant.pipeline import QuantConfig, QuantResult

REPORT = "quantize_report.json"


def compressed_tensors_config(qcfg: QuantConfig, family: ModelFamily) -> dict:
    """compressed-tensors ``pack-quantized``: one config group for every targeted Linear; the vision tower and lm_head
    in ``ignore``."""
    spec = qcfg.spec
    weights = {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.sym, "dynamic": False,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size, "actorder": None, "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head", "re:.*visual.*"],
        "kv_cache_scheme": None,
        "meta": {"quantizer": f"qvlquant:{__version__}", "method": qcfg.method},
    }


def quantization_config(qcfg: QuantConfig, family: ModelFamily) -> dict:
    spec = qcfg.spec
    not_converted = family.unquantized_disk_names()
    if qcfg.export_format == "compressed-tensors":
        return compressed_tensors_config(qcfg, family)
    if qcfg.method == "awq":
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "zero_point": not spec.sym,
            "modules_to_not_convert": not_converted,
        }
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "desc_act": qcfg.desc_act,
        "static_groups": qcfg.static_groups,
        "true_sequential": qcfg.true_sequential,
        "damp_percent": qcfg.damp_percent,  # what was asked; the damping each layer used is in quantize_report.json
        "pack_dtype": "int32",
        "modules_in_block_to_quantize": [list(g) for g in family.linear_groups],
        "modules_to_not_convert": not_converted,
        "meta": {"quantizer": [f"qvlquant:{__version__}"], "method": qcfg.method},
    }


def checkpoint_tensors(model, family: ModelFamily, result: QuantResult, qcfg: QuantConfig, dtype) -> dict:
    """The state dict to save: packed tensors for quantized linears, everything else in the storage dtype."""
    quantized = set(result.weights)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {}
    for name, t in model.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        if (module in quantized and leaf == "weight") or (tied and name == "lm_head.weight"):
            continue
        tensors[family.to_disk(name)] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    for name, w in result.weights.items():
        for key, t in qcfg.pack_format.pack(w).items():
            tensors[f"{family.to_disk(name)}.{key}"] = t.contiguous()
    return tensors


def save_shards(tensors: dict[str, torch.Tensor], folder: pathlib.Path, max_shard_bytes: int | None) -> list[str]:
    """One ``model.safetensors``, or shards of at most ``max_shard_bytes`` with a ``model.safetensors.index.json``
    in the layout transformers writes. -> the file names written."""
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[list[str]] = [[]]
    used = 0
    for key in tensors:  # state-dict order keeps a layer's tensors together
        if shards[-1] and used + sizes[key] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _strip_truncation(folder: pathlib.Path) -> None:
    """vLLM fails on a tokenizer.json that carries calibration truncation; none is ever saved."""
    path = folder / "tokenizer.json"
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("truncation") is not None:
            data["truncation"] = None
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def export(model, processor, family: ModelFamily, result: QuantResult, qcfg: QuantConfig, out: str | os.PathLike,
           dtype: torch.dtype, report: dict, max_shard_bytes: int | None = 5 * 2**30) -> pathlib.Path:
    out = pathlib.Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_shards(checkpoint_tensors(model, family, result, qcfg, dtype), tmp, max_shard_bytes)
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config(qcfg, family)
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
            _strip_truncation(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
