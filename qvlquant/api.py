"""The main job as one function: load the base model, build calibration batches, quantize layer by layer, export."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import resource
import shutil
import time

import torch

from qvlquant import __version__
from qvlquant.calib.dataset import CalibConfig, build_batches
from qvlquant.calib.sources import load_samples
from qvlquant.export import export
from qvlquant.models import load_base
from qvlquant.pipeline import QuantConfig, quantize_model
from qvlquant.quant.rtn import QuantSpec


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize(
    output: str | os.PathLike,
    model: str = "demo",
    method: str = "rtn",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    calib: str = "demo",
    num_samples: int = 64,
    seed: int = 0,
    calib_config: CalibConfig | None = None,
    dtype: torch.dtype = torch.float32,
    pad_intermediate_to: int | None = None,
    trust_remote_code: bool = False,
    calib_split: str = "train",
    calib_columns: dict | None = None,
    resume: bool = True,
    **method_options,
) -> dict:
    """Quantize ``model`` with ``method`` and write the checkpoint to ``output``. -> the report it saved."""
    t0 = time.time()
    torch.manual_seed(seed)
    from qvlquant.quant import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "awq" and (bits != 4 or sym) and method_options.get("export_format", "auto") == "auto":
        raise ValueError("AWQ exports the AWQ GEMM format: 4-bit with zero point (--asym) only")
    spec = QuantSpec(bits, group_size, sym)
    net, processor, family, store_dtype = load_base(model, dtype=dtype, trust_remote_code=trust_remote_code)
    qcfg = QuantConfig(method=method, spec=spec, storage_dtype=store_dtype, **method_options)
    if pad_intermediate_to:
        from qvlquant.transforms import pad_intermediate

        pad_intermediate(net, family, pad_intermediate_to)
    samples, names, root = load_samples(calib, num_samples, seed, calib_split, calib_columns)
    cfg = calib_config or CalibConfig()
    if root and cfg.image_root is None:
        cfg = dataclasses.replace(cfg, image_root=root)
    batches = build_batches(processor, samples, cfg, names, v1=family.needs_remote_code)
    out = pathlib.Path(output).resolve()
    from qvlquant.models import resolve_model_path
    from qvlquant.resume import LayerCheckpoints, fingerprint, model_fingerprint

    partial = out.with_name(f".{out.name}.partial")
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    print_ = fingerprint(version=__version__, model=model_fingerprint(resolve_model_path(model)), calib=names,
                         calib_config=cfg, qcfg=qcfg, pad=pad_intermediate_to, dtype=dtype)
    checkpoints = LayerCheckpoints(partial, print_)
    result = quantize_model(net, family, batches, qcfg, checkpoints)
    report = {
        "qvlquant_version": __version__,
        "base_model": str(model),
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "pad_intermediate_to": pad_intermediate_to,
        "options": {k: v for k, v in vars(qcfg).items() if k not in ("method", "spec", "storage_dtype")},
        "calibration": {"source": calib, "num_samples": num_samples, "seed": seed, "batches": len(batches),
                        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
                        "max_pixels": cfg.max_pixels, "min_pixels": cfg.min_pixels, "max_length": cfg.max_length},
        "layers": result.layer_info,
        "quantize_seconds": round(result.seconds, 2),
        "total_seconds": round(time.time() - t0, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    export(net, processor, family, result, qcfg, out, store_dtype, report)
    checkpoints.remove()
    return report
