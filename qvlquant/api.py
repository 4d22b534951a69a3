"""The main job as one function: check everything, build the calibration batches, stream the model through the
layer loop one decoder layer at a time, and export.

Memory holds the vision tower and embeddings during the capture pass, then one decoder layer, its statistics and
the calibration activations; never the whole model (see ``estimate``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import torch

from qvlquant.calib.dataset import build_batches
from qvlquant.calib.sources import load_samples
from qvlquant.checkpoint.export import CheckpointTensors, export, quantization_config
from qvlquant.checkpoint.vllm import vllm_compatibility_warnings
from qvlquant.config import JobConfig
from qvlquant.engine.estimate import estimate, format_estimate
from qvlquant.engine.loop import LoopPlan, QuantResult, check_group_size, quantize_model
from qvlquant.engine.resume import (
    DiskStore,
    RankStore,
    batches_digest,
    model_digest,
    settings_fingerprint,
)
from qvlquant.engine.skeleton import (
    build_skeleton,
    check_processor_files,
    check_remote_code,
    load_config,
    read_model_type,
    resolve_model_path,
    storage_dtype,
)
from qvlquant.engine.streaming import StreamedLayers
from qvlquant.engine.transforms import pad_config
from qvlquant.families import family_for
from qvlquant.parallel.devices import (
    choose_offload,
    compute_dtype,
    peak_gpu_bytes,
    peak_rss_bytes,
    resolve_device,
    set_threads,
)
from qvlquant.parallel.distributed import (
    World,
    barrier,
    check_same,
    each,
    shard,
    start,
    stop,
)
from qvlquant.storage.outputs import check_output_target
from qvlquant.storage.shards import ShardReader
from qvlquant.ui.progress import say
from qvlquant.version import __version__


def quantize(config: JobConfig | None = None, **settings) -> dict | None:
    """Quantize a model and export it. Pass a ``JobConfig``, or flat settings named like the CLI flags
    (``qvlquant.quantize(output="out/q", method="awq")``). -> the report saved beside the weights (for a run
    stopped by ``max_layers``: the report of the layers done, saved in the partial folder).

    Under torchrun (or ``--nproc``) every process calls this; each runs its share of the calibration batches
    (``qvlquant.parallel.distributed``) and rank 0 alone writes; the other ranks return None."""
    if config is None:
        config = JobConfig.from_flat(**settings)
    elif settings:
        raise TypeError("pass either a JobConfig or flat settings, not both")
    world = World.from_env()
    device = resolve_device(config.device.device, world.local_rank if world.distributed else None)
    start(world, device)
    try:
        return _quantize(config, world, device)
    finally:
        stop(world)


def _quantize(config: JobConfig, world: World, device: torch.device) -> dict | None:
    t0 = time.time()
    torch.manual_seed(config.calib.seed)
    job = _prepare(config, world, device)
    if world.leader:
        _warn_about_vllm(config, job)
    batches = _batches(config, job)
    digest = batches_digest(batches)
    check_same(digest, "the calibration batches", world)
    if len(batches) < world.size:
        raise ValueError(f"{len(batches)} calibration batches for {world.size} processes: every process needs at "
                         "least one; use more samples (--num-samples), a smaller --batch-size or fewer processes")
    shards = [shard(len(batches), world, r) for r in range(world.size)]
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    if world.leader:
        job["estimate"] = estimate(job["skeleton"], job["family"], config, job["device"], tokens, job["storage"],
                                   world.size)
        say(format_estimate(job["estimate"]))
    store = DiskStore(job["partial"], settings_fingerprint(
        version=__version__, settings=config.result_settings(), model=model_digest(job["folder"]),
        batches=digest, storage=str(job["storage"]), compute=str(job["dtype"]))) if world.leader else None
    if world.distributed:
        store = RankStore(store, world, shards)
    local = [batches[b] for b in shards[world.rank]]
    offload = choose_offload(job["device"], _activation_bytes(local, job["hidden"], job["dtype"]),
                             config.device.offload)
    plan = LoopPlan(job["family"], config.quant, config.pack_format, job["storage"], offload, config.max_layers,
                    world)
    source = StreamedLayers(job["skeleton"], job["family"], job["reader"], job["device"], job["dtype"],
                            config.pad_intermediate_to)
    say(f"loading the vision tower and embeddings onto {job['device']} for the capture pass"
        + (f" ({world.size} processes, {len(local)} of {len(batches)} batches each)" if world.distributed else ""))
    source.prepare_capture()
    result = quantize_model(job["skeleton"], local, plan, source, store)
    job["peak_rss"] = each(peak_rss_bytes(), world)
    barrier(world)
    if not world.leader:
        return None
    store = store.inner if world.distributed else store
    make_report = lambda: _report(config, job, batches, result, t0, offload)  # noqa: E731
    if not result.complete:
        report = make_report()
        (job["partial"] / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        say(f"stopped after {len(store.finished())} of {result.num_layers} layers (--max-layers); "
            f"rerun without it to finish from {job['partial']}")
        return report
    say(f"writing the export to {job['out']}")
    base = CheckpointTensors(job["reader"], job["family"], job["storage"])
    job["export_started"] = time.time()
    options = dataclasses.replace(config.export, protected=tuple(str(p) for p in job["protected"]))
    export(job["skeleton"], job["processor"], result, job["out"], make_report, base, options)
    store.remove()
    return json.loads((job["out"] / "quantize_report.json").read_text())


def _prepare(config: JobConfig, world: World, device: torch.device) -> dict:
    """Every check that needs no calibration data, in seconds: model type, remote code, processor files,
    --output (rank 0: the only one that writes), group sizes (on a meta skeleton). -> what the run needs."""
    threads = set_threads(config.device.threads, world.local_size)
    folder = resolve_model_path(config.model)
    family = family_for(read_model_type(folder))
    check_remote_code(family, folder, config.trust_remote_code)
    hf_config = load_config(folder, family)
    storage = storage_dtype(hf_config)  # before the skeleton is built: building it sets config.dtype
    check_processor_files(folder, family)
    out = pathlib.Path(config.output).expanduser().resolve()
    protected = (folder,) + _calib_paths(config.calib.source)
    if world.leader:
        check_output_target(out, protected, config.export.overwrite)
    dtype = compute_dtype(device, config.device.dtype)
    say(f"building {family.name} from {folder} on the meta device")
    skeleton = build_skeleton(hf_config, family, dtype)
    padded = pad_config(skeleton.config, config.pad_intermediate_to) if config.pad_intermediate_to else None
    check_group_size(skeleton, family, config.quant.spec, padded)
    reader = ShardReader(folder)
    partial = out.with_name(f".{out.name}.partial")
    if not config.resume and world.leader:
        DiskStore.discard(partial)  # --no-resume: our own partial run, never another folder
    text = getattr(hf_config, "text_config", hf_config)
    return dict(device=device, threads=threads, folder=folder, family=family, out=out, protected=protected,
                dtype=dtype, skeleton=skeleton, reader=reader, partial=partial, storage=storage,
                hidden=text.hidden_size, processor=_processor(folder, family), padded=padded)


def _warn_about_vllm(config: JobConfig, job: dict) -> None:
    """Say before any work when vLLM (its own code when installed, else the copied rules) will refuse the export."""
    layers = len(job["skeleton"].get_submodule(job["family"].decoder_layers))
    qc = quantization_config(config.quant, config.pack_format, job["family"], layers)
    for line in vllm_compatibility_warnings(qc, job["family"]):
        print(f"qvlquant quantize: warning: {line}", file=sys.stderr, flush=True)


def _processor(folder: pathlib.Path, family):
    from transformers import (  # heavy; the model type was checked first
        AutoProcessor,
        AutoTokenizer,
    )

    if family.needs_remote_code:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return AutoProcessor.from_pretrained(folder)


def _calib_paths(source: str) -> tuple[pathlib.Path, ...]:
    """The calibration data's file or folder, when it is one (never replaced by --output)."""
    if source in ("demo", "easyvqa") or source.startswith("hf:"):
        return ()
    path = pathlib.Path(source).expanduser()
    return (path,) if path.exists() else ()


def _batches(config: JobConfig, job: dict) -> list[dict]:
    src = config.calib
    samples, names, root = load_samples(src.source, src.num_samples, src.seed, src.split, dict(src.columns))
    cfg = config.processing
    if root and cfg.image_root is None:
        cfg = dataclasses.replace(cfg, image_root=root)
    say(f"encoding {len(samples)} calibration samples through the processor")
    return build_batches(job["processor"], samples, cfg, names, v1=job["family"].needs_remote_code)


def _activation_bytes(batches: list[dict], hidden: int, dtype: torch.dtype) -> int:
    """Hidden states of every calibration batch, plus the position embeddings that travel with them."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return tokens * hidden * torch.tensor([], dtype=dtype).element_size() * 2


def _report(config: JobConfig, job: dict, batches: list[dict], result: QuantResult, t0: float, offload) -> dict:
    device = job["device"]
    gpu = peak_gpu_bytes(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {job['threads']} threads"
    return {
        "qvlquant_version": __version__,
        "config": config.to_dict(),
        "base_model": str(config.model),
        "method": config.quant.method,
        "bits": config.quant.spec.bits,
        "group_size": config.quant.spec.group_size,
        "sym": config.quant.spec.sym,
        "calibration": {"source": config.calib.source, "num_samples": config.calib.num_samples,
                        "seed": config.calib.seed, "batches": len(batches),
                        "tokens": int(sum(b["attention_mask"].sum() for b in batches))},
        "device": str(device),
        "compute_dtype": str(job["dtype"]).removeprefix("torch."),
        "activations_on": offload or str(device),
        "layers": result.layer_info,
        "layer_seconds": {str(k): v for k, v in result.layer_seconds.items()},
        "phase_seconds": result.phases.rounded(),
        "complete": result.complete,
        "quantize_seconds": round(result.seconds, 2),
        "export_seconds": round(time.time() - job["export_started"], 2) if "export_started" in job else None,
        "total_seconds": round(time.time() - t0, 2),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "processes": len(job["peak_rss"]),
        "peak_rss_gib_per_process": [round(b / 2**30, 3) for b in job["peak_rss"]],  # at the loop's end
        "peak_gpu_allocated_gib": None if gpu is None else round(gpu / 2**30, 3),
        "estimate": job["estimate"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({job['threads']} used), torch {torch.__version__}"
                   f", {where}",
    }
