"""The main job as one function: check everything, build the calibration batches, stream the model through the
layer loop one decoder layer at a time, and export.

Memory holds the vision tower and embeddings during the capture pass, then one decoder layer, its statistics and
the calibration activations; never the whole model (see ``estimate``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import torch

from qvlquant.calib.dataset import build_batches, image_files
from qvlquant.calib.sources import load_samples
from qvlquant.checkpoint.export import (
    REPORT,
    CheckpointTensors,
    export,
    quantization_config,
)
from qvlquant.checkpoint.datafree import (
    SmoothedTensors,
    check_nvfp4_groups,
    export_fp8,
    export_nvfp4,
    export_rtn,
    quantized_linears,
)
from qvlquant.checkpoint.vllm import vllm_compatibility_warnings
from qvlquant.config import SEARCH_IN_ONE_PROCESS, JobConfig, SearchConfig
from qvlquant.engine.calibration import InputRanges, Smoothing, input_ranges
from qvlquant.engine.estimate import estimate, format_estimate
from qvlquant.engine.experts import coverage
from qvlquant.engine.loop import (
    LayerStore,
    LoopPlan,
    QuantResult,
    check_group_size,
    decoder_linears,
    fused_groups,
    quantize_model,
)
from qvlquant.engine.resume import (
    DiskStore,
    RankStore,
    batches_digest,
    model_digest,
    settings_fingerprint,
)
from qvlquant.engine.sensitivity import SensitivityPlan, format_choice, timed_search
from qvlquant.engine.skeleton import (
    build_skeleton,
    check_processor_files,
    check_remote_code,
    load_config,
    load_processor,
    read_model_type,
    resolve_model_path,
    storage_dtype,
)
from qvlquant.engine.streaming import (
    StreamedLayers,
    check_checkpoint,
    check_config_fits,
)
from qvlquant.engine.transforms import pad_config
from qvlquant.families import ModelFamily, family_for
from qvlquant.parallel.devices import (
    bound_heap,
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
from qvlquant.parallel.launch import check_batches
from qvlquant.quant.formats import W8A8_SCHEMES, Nvfp4Format
from qvlquant.quant.rules import ModulePlan, format_plan, plan_rows
from qvlquant.recipes import dump_recipe, job_recipe
from qvlquant.storage.lock import output_lock
from qvlquant.storage.outputs import beside, check_output_target, check_output_writable
from qvlquant.storage.shards import ShardReader, checkpoint_files
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
    device = resolve_device(config.device.device, world.local_rank if world.distributed else None)  # checked
    bound_heap()  # freed layer temporaries go back to the system instead of staying in a fragmented heap
    if config.datafree_format is not None:
        return _quantize_datafree(config, world)
    if config.calibrated_format is not None:
        return _quantize_calibrated(config, world, device)
    if config.w8a8_calibrated:
        return _quantize_w8a8(config, world, device)
    if _rtn_from_the_checkpoint(config, world):
        return _quantize_rtn(config, world)
    start(world, device)
    try:
        return _quantize(config, world, device)
    finally:
        stop(world)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedJob:
    """What ``_prepare`` checked, found and built before any calibration work; fixed for the rest of the run."""

    device: torch.device  # where the layer and its math live
    threads: int  # the CPU threads torch uses
    folder: pathlib.Path  # the base model's checkpoint
    family: ModelFamily
    out: pathlib.Path  # --output, resolved
    protected: tuple[pathlib.Path, ...]  # every input read (model files, calibration data, images): never replaced
    dtype: torch.dtype  # the compute dtype
    storage: torch.dtype  # the checkpoint's dtype: what the export writes
    skeleton: torch.nn.Module  # the model on the meta device, filled part by part
    reader: ShardReader  # the base checkpoint's shards
    partial: pathlib.Path  # .<output>.partial: this run's finished layers, kept for a resume
    hidden: int  # the text model's hidden size
    processor: object  # what encodes the calibration samples, saved with the export
    padded: int | None  # the MLP's intermediate size after --pad-intermediate-to (None: not padded)
    modules: ModulePlan  # the job's settings and its per-module rules, checked against the model's linears


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunMeasures:
    """What the run measured on its way, for the report."""

    started: float  # time.time() when the run began
    estimate: dict | None  # what was estimated before the loop (rank 0 says it; None on the other ranks)
    offload: str | None  # where the activations waited between layers (None: on the device)
    peak_rss: tuple[int, ...]  # every process's peak resident bytes at the loop's end, in rank order
    export_started: float | None = None  # time.time() when the export began (None: stopped by --max-layers)
    mixed_precision: dict | None = None  # the sensitivity search's table and choice (--target-bits)


def _quantize(config: JobConfig, world: World, device: torch.device) -> dict | None:
    t0 = time.time()
    torch.manual_seed(config.calib.seed)
    with contextlib.ExitStack() as held:  # rank 0's lock on --output: from its checks until the export is published
        job = _prepare(config, world, device, held)
        if world.leader and not config.search.active:
            _warn_about_vllm(config, job)
        batches, job = _batches(config, job, world)
        mixed = None
        if config.search.active:  # the quantize run below is then that of the recipe the search writes
            config, job, mixed = _search(config, job, batches, world)
            _warn_about_vllm(config, job)
        digest = batches_digest(batches)
        check_same(digest, "the calibration batches", world)
        check_batches(len(batches), world.size)
        shards = [shard(len(batches), world, r) for r in range(world.size)]
        tokens = int(sum(b["attention_mask"].sum() for b in batches))
        estimated = None
        if world.leader:
            estimated = estimate(job.skeleton, job.family, config, job.device, tokens, job.storage, world.size)
            say(format_estimate(estimated))
        store = _open_store(config, job, world, digest, shards)
        local = [batches[b] for b in shards[world.rank]]
        offload = choose_offload(job.device, _activation_bytes(local, job.hidden, job.dtype), config.device.offload)
        plan = LoopPlan(family=job.family, qcfg=config.quant, pack_format=config.pack_format,
                        storage_dtype=job.storage, offload=offload, max_layers=config.max_layers, world=world,
                        modules=job.modules if job.modules.mixed else None)
        source = StreamedLayers(model=job.skeleton, family=job.family, reader=job.reader, device=job.device,
                                dtype=job.dtype, pad_to=config.pad_intermediate_to)
        say(f"loading the vision tower and embeddings onto {job.device} for the capture pass"
            + (f" ({world.size} processes, {len(local)} of {len(batches)} batches each)" if world.distributed else ""))
        source.prepare_capture()
        result = quantize_model(job.skeleton, local, plan, source, store)
        peak_rss = tuple(each(peak_rss_bytes(), world))
        measures = RunMeasures(started=t0, estimate=estimated, offload=offload, peak_rss=peak_rss,
                               mixed_precision=mixed)
        barrier(world)
        report = None
        if world.leader:
            report = _finish(config, job, batches, result, measures, store.inner if world.distributed else store)
        barrier(world)  # every rank leaves the process group together, once rank 0 has published (not mid-export)
        return report


def _quantize_datafree(config: JobConfig, world: World) -> dict:
    """A data-free scheme (``config.datafree_format``: FP8, INT8 W8A8 or NVFP4A16): the checks of any run, then each
    decoder-layer linear quantized as the export streams it from the checkpoint (``checkpoint.datafree``). One
    process, on the CPU: the work is reading and writing. -> the report saved beside the weights."""
    if world.distributed:
        raise ValueError(f"scheme {config.scheme} quantizes data-free in one process, as fast as the checkpoint "
                         "reads; run it without --nproc / torchrun")
    t0 = time.time()
    with contextlib.ExitStack() as held:
        job = _prepare(config, world, torch.device("cpu"), held)
        kind = "FP8" if config.fp8_format is not None else "NVFP4" if config.nvfp4_format is not None else "INT8"
        say(f"{config.scheme}: quantizing {job.family.name}'s decoder linears to {kind} as they stream from "
            f"{job.folder} to {job.out} (no calibration data)")
        base = CheckpointTensors(job.reader, job.family, job.storage)
        options = dataclasses.replace(config.export, protected=tuple(str(p) for p in job.protected))
        if config.nvfp4_format is not None:
            export_nvfp4(job.skeleton, job.processor, base, config.nvfp4_format, job.out,
                         lambda quantized: _nvfp4_report(config, job, quantized, t0), options, base_folder=job.folder)
        else:
            export_fp8(job.skeleton, job.processor, base, config.datafree_format, job.out,
                       lambda quantized: _datafree_report(config, job, quantized, t0), options, base_folder=job.folder)
    return json.loads((job.out / REPORT).read_text())


def _quantize_calibrated(config: JobConfig, world: World, device: torch.device) -> dict:
    """A calibrated scheme (``config.calibrated_format``: FP8 with static input scales, NVFP4 W4A4): the checks of
    any run and the calibration batches, one streamed pass over the decoder layers recording the largest input of
    every linear the export quantizes (``engine.calibration``: one decoder layer in memory at a time, the vision
    tower never observed), then the export streamed from the checkpoint as a data-free scheme's, each linear's
    activation scale beside its weight. NVFP4 with a smoothing strength (its default) smooths each layer first
    (``engine.calibration.Smoothing``, SmoothQuant folded into its norms and linears) and observes it smoothed; the
    export writes the smoothed norms and quantizes the smoothed weights (``checkpoint.datafree.SmoothedTensors``).
    One process. -> the report saved beside the weights."""
    if world.distributed:
        raise ValueError(f"scheme {config.scheme} calibrates in one process (one forward pass over the calibration "
                         "data, one decoder layer at a time); run it without --nproc / torchrun")
    t0 = time.time()
    torch.manual_seed(config.calib.seed)
    fmt = config.calibrated_format
    with contextlib.ExitStack() as held:
        job = _prepare(config, world, device, held)
        names = quantized_linears(job.skeleton, job.family)
        if isinstance(fmt, Nvfp4Format):
            check_nvfp4_groups(job.skeleton, names)  # before any data is read
        batches, job = _batches(config, job, world)
        offload = choose_offload(job.device, _activation_bytes(batches, job.hidden, job.dtype), config.device.offload)
        source = StreamedLayers(model=job.skeleton, family=job.family, reader=job.reader, device=job.device,
                                dtype=job.dtype)
        say(f"{config.scheme}: recording the largest input of {len(names)} decoder linears over {len(batches)} "
            f"calibration batches on {job.device}, one layer at a time (the vision tower is not quantized)")
        smoothing = None
        if isinstance(fmt, Nvfp4Format) and config.smoothing is not None:
            smoothing = Smoothing(config.smoothing, job.storage, config.quant)
            say(f"{config.scheme}: SmoothQuant (strength {config.smoothing}) folded into each layer before it is "
                "observed")
        source.prepare_capture()
        ranges = input_ranges(job.skeleton, batches, job.family, names, source, offload, prepare=smoothing)
        say(f"{config.scheme}: writing {job.out}, weights from {job.folder} and the activation scales of "
            f"{ranges.tokens} calibration tokens")
        base = CheckpointTensors(job.reader, job.family, job.storage)
        if smoothing is not None:
            base = SmoothedTensors(base, smoothing)
        options = dataclasses.replace(config.export, protected=tuple(str(p) for p in job.protected))
        report = lambda quantized: _calibrated_report(config, job, batches, ranges, quantized, t0,  # noqa: E731
                                                      smoothing)
        write = export_nvfp4 if isinstance(fmt, Nvfp4Format) else export_fp8
        write(job.skeleton, job.processor, base, fmt, job.out, report, options, base_folder=job.folder,
              inputs=ranges.amax)
    return json.loads((job.out / REPORT).read_text())


def _quantize_w8a8(config: JobConfig, world: World, device: torch.device) -> dict:
    """Calibrated INT8 W8A8 (``config.w8a8_calibrated``): the layer loop of the integer methods, each decoder layer
    smoothed (SmoothQuant, folded into its norms and linears) and its linears rounded by GPTQ or to nearest onto the
    int8 per-channel grid (``quant.apply.w8a8_layer``); exported in the data-free W8A8's layout and config, the
    smoothed norms in place of the base's. One process. -> the report saved beside the weights."""
    if world.distributed:
        raise ValueError("scheme W8A8 with SmoothQuant / GPTQ calibrates in one process; run it without --nproc / "
                         "torchrun")
    t0 = time.time()
    torch.manual_seed(config.calib.seed)
    with contextlib.ExitStack() as held:
        job = _prepare(config, world, device, held)
        batches, job = _batches(config, job, world)
        digest = batches_digest(batches)
        store = _open_store(config, job, world, digest, [range(len(batches))])
        offload = choose_offload(job.device, _activation_bytes(batches, job.hidden, job.dtype), config.device.offload)
        plan = LoopPlan(family=job.family, qcfg=config.loop_quant, pack_format=W8A8_SCHEMES[config.scheme],
                        storage_dtype=job.storage, offload=offload, max_layers=config.max_layers,
                        smoothing=config.smoothing)
        source = StreamedLayers(model=job.skeleton, family=job.family, reader=job.reader, device=job.device,
                                dtype=job.dtype)
        say(f"W8A8: SmoothQuant ({config.smoothing_strength}) and {plan.qcfg.method} on {len(batches)} calibration "
            f"batches on {job.device}, one decoder layer at a time")
        source.prepare_capture()
        result = quantize_model(job.skeleton, batches, plan, source, store)
        measures = RunMeasures(started=t0, estimate=None, offload=offload, peak_rss=(peak_rss_bytes(),))
        report = _finish(config, job, batches, result, measures, store)
    return report


def _w8a8_calibrated_report(config: JobConfig, job: PreparedJob, report: dict) -> dict:
    """The layer loop's report of a calibrated W8A8 run, with the scheme's fields: what rounded the weights, the
    smoothing strength asked and each smoothed group's (searched: per layer and group), by the runtime name of
    the norm or linear its scales were folded into."""
    head, strengths = job.family.decoder_layers, {}
    for name, info in report["layers"].items():
        if "smoothed_by" in info:
            layer = name[len(head) + 1:].split(".", 1)[0]
            strengths[f"{head}.{layer}.{info['smoothed_by']}"] = info["strength"]
    report.pop("plan")  # the integer methods' bits-per-weight table: not this layout's
    return {**report, "method": "int8", "scheme": config.scheme, "rounding": config.quant.method, "bits": 8,
            "group_size": -1, "sym": True,
            "weights": f"int8 symmetric, weight_scale absmax/127 per output channel ({config.quant.method} on the "
                       "smoothed weights)",
            "activations": "int8 symmetric, dynamic per token (absmax/127)",
            "smoothing": {"strength": config.smoothing_strength, "groups": strengths}}


def _rtn_from_the_checkpoint(config: JobConfig, world: World) -> bool:
    """Round-to-nearest reads no activations, so it rounds each linear as the export streams it from the
    checkpoint: not for a distributed run, a measurement (--max-layers), a padded MLP, a sensitivity search,
    calibration data given with --calib (run through the layers, which checks the activations stay finite), or
    when a partial run of this output is there to be resumed (the layer loop serves those)."""
    if config.quant.method != "rtn" or world.distributed or config.max_layers is not None:
        return False
    if config.pad_intermediate_to is not None or config.search.target_bits is not None:
        return False
    if config.calib.source != "demo":  # data given on purpose: run it through the layers (activations checked)
        return False
    return not beside(pathlib.Path(config.output).expanduser().resolve(), "partial").exists()


def _quantize_rtn(config: JobConfig, world: World) -> dict:
    """RTN straight from the checkpoint (``checkpoint.datafree.export_rtn``): the checks of any run, no calibration
    pass, no replay; the same tensors the layer loop writes. -> the report saved beside the weights."""
    t0 = time.time()
    with contextlib.ExitStack() as held:
        job = _prepare(config, world, torch.device("cpu"), held)
        _warn_about_vllm(config, job)
        say(f"rtn: rounding {job.family.name}'s decoder linears as they stream from {job.folder} to {job.out} "
            "(no calibration data)")
        base = CheckpointTensors(job.reader, job.family, job.storage)
        options = dataclasses.replace(config.export, protected=tuple(str(p) for p in job.protected))
        export_rtn(job.skeleton, job.processor, base, config.quant, job.modules, config.pack_format, job.out,
                   lambda quantized: _rtn_report(config, job, quantized, t0), options, base_folder=job.folder)
    return json.loads((job.out / REPORT).read_text())


def _rtn_report(config: JobConfig, job: PreparedJob, quantized: list[str], started: float) -> dict:
    """What quantize_report.json records for RTN rounded straight from the checkpoint."""
    seconds = round(time.time() - started, 2)
    return {
        "qvlquant_version": __version__,
        "config": config.to_dict(),
        "base_model": str(config.model),
        "method": "rtn",
        "bits": config.quant.spec.bits,
        "group_size": config.quant.spec.group_size,
        "sym": config.quant.spec.sym,
        "data_free": True,
        "calibration": None,
        "plan": plan_rows(job.modules, decoder_linears(job.skeleton, job.family, job.padded), config.pack_format),
        "layers": {name: {} for name in quantized},
        "complete": True,
        "quantize_seconds": seconds,  # rounding, packing and writing happen together, tensor by tensor
        "total_seconds": seconds,
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({job.threads} used), torch {torch.__version__}",
    }


def _datafree_report(config: JobConfig, job: PreparedJob, quantized: list[str], started: float) -> dict:
    """What quantize_report.json records for a data-free scheme."""
    if config.fp8_format is None:
        return _w8a8_report(config, job, quantized, started)
    fmt = config.fp8_format
    group = fmt.activation_group
    return _scheme_report(config, job, quantized, started, method="fp8", bits=8,
                          weights=f"float8_e4m3fn, {fmt.scale_name} " + ("per 128x128 block" if group else
                                                                          "per output channel"),
                          activations="float8_e4m3fn, dynamic per token" + (f" and group of {group} inputs" if group
                                                                            else ""))


def _w8a8_report(config: JobConfig, job: PreparedJob, quantized: list[str], started: float) -> dict:
    """What quantize_report.json records for the data-free INT8 W8A8 scheme (round-to-nearest per channel)."""
    fmt = config.datafree_format
    return _scheme_report(config, job, quantized, started, method="int8", bits=8,
                          weights=f"int8 symmetric, {fmt.scale_name} absmax/127 per output channel (round-to-nearest)",
                          activations="int8 symmetric, dynamic per token (absmax/127)")


NVFP4_WEIGHTS = ("float4_e2m1, weight_scale float8_e4m3fn per 16 inputs, weight_global_scale float32 per tensor "
                 "(shared by the linears vLLM fuses)")


def _nvfp4_report(config: JobConfig, job: PreparedJob, quantized: list[str], started: float) -> dict:
    """What quantize_report.json records for NVFP4A16."""
    return _scheme_report(config, job, quantized, started, method="nvfp4", bits=4,
                          weights=NVFP4_WEIGHTS,
                          activations="not quantized (weight-only)")


def _calibrated_report(config: JobConfig, job: PreparedJob, batches: list[dict], ranges: InputRanges,
                       quantized: list[str], started: float, smoothing: Smoothing | None = None) -> dict:
    """What quantize_report.json records for a calibrated scheme: the data-free fields, the calibration data, and
    each linear's largest calibration input (from which its activation scale was made); for NVFP4, the smoothing
    strength asked and each smoothed group's, by the runtime name of the norm or linear its scales were folded
    into (none: "off")."""
    fmt = config.calibrated_format
    if isinstance(fmt, Nvfp4Format):
        report = _scheme_report(config, job, quantized, started, method="nvfp4", bits=4,
                                weights=NVFP4_WEIGHTS,
                                activations="float4_e2m1 per token and group of 16 inputs (dynamic e4m3 group "
                                            "scales) under input_global_scale float32, calibrated per tensor "
                                            "(448 * 6 / largest input; shared by the linears vLLM fuses)")
    else:
        report = _scheme_report(config, job, quantized, started, method="fp8", bits=8,
                                weights="float8_e4m3fn, weight_scale per tensor (shared by the linears vLLM fuses)",
                                activations="float8_e4m3fn, static: input_scale per tensor, calibrated (largest "
                                            "input / 448; shared by the linears vLLM fuses)")
    report["calibration"] = {"source": config.calib.source, "num_samples": config.calib.num_samples,
                             "seed": config.calib.seed, "batches": len(batches), "tokens": ranges.tokens,
                             "observer": "static_minmax (largest |x| over the real tokens, full-precision layers)",
                             "seconds": round(ranges.seconds, 2)}
    for name in quantized:
        report["layers"][name]["input_amax"] = ranges.amax[name]
    if isinstance(fmt, Nvfp4Format):
        report["smoothing"] = {"strength": config.smoothing_strength,
                               "groups": {} if smoothing is None else dict(smoothing.groups)}
    report["device"] = str(job.device)
    report["compute_dtype"] = str(job.dtype).removeprefix("torch.")
    return report


def _scheme_report(config: JobConfig, job: PreparedJob, quantized: list[str], started: float, *, method: str,
                   bits: int, weights: str, activations: str) -> dict:
    """The report of an FP8, INT8 W8A8 or NVFP4 scheme, whose fields name its weights and activations."""
    fmt = config.datafree_format or config.calibrated_format
    return {
        "qvlquant_version": __version__,
        "config": config.to_dict(),
        "base_model": str(config.model),
        "method": method,
        "scheme": config.scheme,
        "bits": bits,
        "weights": weights,
        "activations": activations,
        "calibration": None,
        "layers": {name: {"format": fmt.value} for name in quantized},
        "complete": True,
        "total_seconds": round(time.time() - started, 2),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({job.threads} used), torch {torch.__version__}",
    }


def _search(config: JobConfig, job: PreparedJob, batches: list[dict],
            world: World) -> tuple[JobConfig, PreparedJob, dict]:
    """--target-bits: the sensitivity pass (streamed from the checkpoint like the quantize loop) and the choice.
    -> (the job with the search's rules after the user's and the search off, the job's checked plan, the report's
    mixed_precision section)."""
    if world.distributed:
        raise ValueError(SEARCH_IN_ONE_PROCESS)
    fmt, storage_bits = config.pack_format, torch.finfo(job.storage).bits
    search = config.search
    plan = SensitivityPlan(family=job.family, qcfg=config.quant, pack_format=fmt, candidates=search.candidate_bits,
                           measure=search.measure, fixed=job.modules if job.modules.mixed else None,
                           storage_bits=storage_bits,
                           offload=choose_offload(job.device, _activation_bytes(batches, job.hidden, job.dtype),
                                                  config.device.offload))
    source = StreamedLayers(model=job.skeleton, family=job.family, reader=job.reader, device=job.device,
                            dtype=job.dtype, pad_to=config.pad_intermediate_to)
    say(f"sensitivity search: {search.measure} error of each linear group at "
        f"{', '.join(map(str, search.candidate_bits))} bits, for {search.target_bits:g} bits per weight")
    source.prepare_capture()
    linears = decoder_linears(job.skeleton, job.family, job.padded)
    result, section = timed_search(job.skeleton, batches, plan, source, linears, search.target_bits)
    config = dataclasses.replace(config, rules=config.rules + result.rules, search=SearchConfig())
    modules = ModulePlan.resolve(config.rules, config.quant, [name for name, _, _ in linears],
                                 fused_groups(job.family, len(job.skeleton.get_submodule(job.family.decoder_layers))))
    say(format_choice(result, plan) + "; the plan:\n" + format_plan(plan_rows(modules, linears, fmt, storage_bits)))
    section["recipe"] = MIXED_RECIPE
    return config, dataclasses.replace(job, modules=modules), section


MIXED_RECIPE = "mixed_precision.yaml"  # the search's choice as a recipe, in the export folder


def mixed_recipe(config: JobConfig, section: dict) -> str:
    """The recipe of the searched job (``config``: its rules included, the search off) as the export carries it."""
    return dump_recipe(job_recipe(config), (
        f"Written by qvlquant {__version__} quantize --target-bits {section['target_bits']:g} "
        f"(sensitivity: {section['measure']}, candidates {','.join(map(str, section['candidates']))}): "
        f"{section['bits_per_weight']:.4f} bits per weight over the decoder linears, scales included.\n"
        "The rules are the search's choice (one per linear group not at the job's width; the first rule that "
        "matches wins);\nthe measured table is in quantize_report.json under mixed_precision. Edit, then rerun "
        "without the search:\n  qvlquant quantize --recipe mixed_precision.yaml --output DIR"))


def _open_store(config: JobConfig, job: PreparedJob, world: World, digest: str,
                shards: list[range]) -> LayerStore | None:
    """Rank 0's partial folder, under a fingerprint of everything that decides the result; in a distributed run
    every rank reaches it through a ``RankStore``."""
    store = DiskStore(job.partial, settings_fingerprint(
        version=__version__, settings=config.result_settings(), model=model_digest(job.folder),
        batches=digest, storage=str(job.storage), compute=str(job.dtype))) if world.leader else None
    return RankStore(store, world, shards) if world.distributed else store


def _finish(config: JobConfig, job: PreparedJob, batches: list[dict], result: QuantResult, measures: RunMeasures,
            store: LayerStore) -> dict:
    """Rank 0, after the loop: the report of a run stopped by --max-layers (in the partial folder), or the export
    of a finished one. -> the report."""
    if not result.complete:
        report = _report(config, job, batches, result, measures)
        (job.partial / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        say(f"stopped after {len(store.finished())} of {result.num_layers} layers (--max-layers); "
            f"rerun without it to finish from {job.partial}")
        return report
    say(f"writing the export to {job.out}")
    base = CheckpointTensors(job.reader, job.family, job.storage)
    measures = dataclasses.replace(measures, export_started=time.time())
    options = dataclasses.replace(config.export, protected=tuple(str(p) for p in job.protected))
    files = {} if measures.mixed_precision is None else {MIXED_RECIPE: mixed_recipe(config, measures.mixed_precision)}
    export(job.skeleton, job.processor, result, job.out, lambda: _report(config, job, batches, result, measures),
           base, options, base_folder=job.folder, files=files)
    store.remove()
    return json.loads((job.out / REPORT).read_text())


def _prepare(config: JobConfig, world: World, device: torch.device, held: contextlib.ExitStack) -> PreparedJob:
    """Every check that needs no calibration data, in seconds: model type, remote code, processor files,
    --output (rank 0: the only one that writes, and which locks it into ``held``), group sizes (on a meta
    skeleton). -> what the run needs."""
    threads = set_threads(config.device.threads, world.local_size)
    folder = resolve_model_path(config.model)
    family = family_for(read_model_type(folder))
    check_remote_code(family, folder, config.trust_remote_code)
    hf_config = load_config(folder, family)
    family = family.bind(hf_config)  # hybrid models: each decoder layer's type
    if config.pad_intermediate_to is not None and not family.mlp_out:
        raise ValueError(f"--pad-intermediate-to: {family.name}'s decoder layers do not all hold one dense MLP to "
                         "pad (its MoE layers hold experts); leave it out")
    storage = storage_dtype(hf_config)  # before the skeleton is built: building it sets config.dtype
    check_processor_files(folder, family)
    out = pathlib.Path(config.output).expanduser().resolve()
    protected = _model_paths(folder) + _calib_paths(config.calib.source)
    if world.leader:
        check_output_target(out, protected, config.export.overwrite)
        check_output_writable(out)
        held.enter_context(output_lock(out))  # before anything reads or removes the partial folder
    reader = ShardReader(folder)
    check_config_fits(hf_config, family, reader)  # config.json's sizes against the headers, before building
    dtype = compute_dtype(device, config.device.dtype)
    say(f"building {family.name} from {folder} on the meta device")
    skeleton = build_skeleton(hf_config, family, dtype)
    padded = pad_config(skeleton.config, config.pad_intermediate_to) if config.pad_intermediate_to else None
    linears = decoder_linears(skeleton, family, padded)
    modules = ModulePlan.resolve(config.rules, config.loop_quant, [name for name, _, _ in linears],
                                 fused_groups(family, len(skeleton.get_submodule(family.decoder_layers))))
    if config.scheme is None:  # a scheme has no integer groups
        check_group_size(skeleton, family, config.quant.spec, padded, modules if modules.mixed else None)
        if world.leader:
            say("the plan (bits per weight with scales and zeros; skipped linears at the checkpoint's 16 bits):\n"
                + format_plan(plan_rows(modules, linears, config.pack_format)))
    check_checkpoint(skeleton, family, reader)  # every tensor there, of its shape, before any data is read
    partial = beside(out, "partial")
    if not config.resume and world.leader:
        DiskStore.discard(partial)  # --no-resume: our own partial run, never another folder
    text = getattr(hf_config, "text_config", hf_config)
    return PreparedJob(device=device, threads=threads, folder=folder, family=family, out=out, protected=protected,
                       dtype=dtype, storage=storage, skeleton=skeleton, reader=reader, partial=partial,
                       hidden=text.hidden_size, processor=load_processor(folder, family), padded=padded,
                       modules=modules)


def _warn_about_vllm(config: JobConfig, job: PreparedJob) -> None:
    """Say before any work when vLLM (its own code when installed, else the copied rules) will refuse the export."""
    layers = len(job.skeleton.get_submodule(job.family.decoder_layers))
    qc = quantization_config(config.quant, config.pack_format, job.family, layers,
                             job.modules if job.modules.mixed else None)
    lines = vllm_compatibility_warnings(qc, job.family)
    if "dynamic" in qc and any(k.startswith("+:") for k in qc["dynamic"]):
        lines.append("per-module widths in the GPTQ format (its 'dynamic' field) load in vLLM but not "
                     "with transformers 5.24's from_pretrained, which has no 'dynamic'; --format compressed-tensors "
                     "loads in both")
    for line in lines:
        print(f"qvlquant quantize: warning: {line}", file=sys.stderr, flush=True)


def _model_paths(folder: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """The base model's folder, the files in it and the weight files its index names (never replaced by --output;
    where they are symlinks, neither is the folder they lead to)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return (folder, *files, *(folder / name for name in checkpoint_files(folder)))


def _calib_paths(source: str) -> tuple[pathlib.Path, ...]:
    """The calibration data's file or folder, or an hf: dataset's local folder (never replaced by --output); the
    images its samples name are added once they are read (``_batches``)."""
    if source in (None, "demo", "easyvqa"):  # None: a data-free scheme reads none
        return ()
    path = pathlib.Path(source.removeprefix("hf:")).expanduser()
    return (path,) if path.exists() else ()


def _batches(config: JobConfig, job: PreparedJob, world: World) -> tuple[list[dict], PreparedJob]:
    """-> (the calibration batches, the job with the image files they were read from among its inputs). The samples
    name their images, so rank 0 checks --output against those before any is opened."""
    src = config.calib
    samples, names, root = load_samples(src.source, src.num_samples, src.seed, src.split, dict(src.columns))
    cfg = config.processing
    if root and cfg.image_root is None:
        cfg = dataclasses.replace(cfg, image_root=root)
    if config.quant.method == "rtn" and not config.w8a8_calibrated and src.source != "demo":
        say(f"note: RTN rounds without calibration data; the samples of --calib {src.source} only run through "
            "the layers to check that activations stay finite")
    job = dataclasses.replace(job, protected=job.protected + tuple(dict.fromkeys(image_files(samples, cfg.image_root))))
    if world.leader:
        check_output_target(job.out, job.protected, config.export.overwrite)
    say(f"encoding {len(samples)} calibration samples through the processor")
    return build_batches(job.processor, samples, cfg, names, v1=job.family.needs_remote_code), job


def _activation_bytes(batches: list[dict], hidden: int, dtype: torch.dtype) -> int:
    """Hidden states of every calibration batch, plus the position embeddings that travel with them."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return tokens * hidden * torch.tensor([], dtype=dtype).element_size() * 2


def _report(config: JobConfig, job: PreparedJob, batches: list[dict], result: QuantResult,
            measures: RunMeasures) -> dict:
    """What quantize_report.json records (and report.json of a stopped run)."""
    device = job.device
    gpu = peak_gpu_bytes(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {job.threads} threads"
    export_started = measures.export_started
    report = {
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
        "compute_dtype": str(job.dtype).removeprefix("torch."),
        "activations_on": measures.offload or str(device),
        "plan": plan_rows(job.modules, decoder_linears(job.skeleton, job.family, job.padded), config.pack_format),
        "layers": result.layer_info,
        "layer_seconds": {str(k): v for k, v in result.layer_seconds.items()},
        "phase_seconds": result.phases.rounded(),
        "peak_rss_gib_by_phase": result.phases.highs_gib(),  # where the resident high-water mark rose
        "complete": result.complete,
        "quantize_seconds": round(result.seconds, 2),
        "export_seconds": None if export_started is None else round(time.time() - export_started, 2),
        "total_seconds": round(time.time() - measures.started, 2),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "processes": len(measures.peak_rss),
        "peak_rss_gib_per_process": [round(b / 2**30, 3) for b in measures.peak_rss],  # at the loop's end
        "peak_gpu_allocated_gib": None if gpu is None else round(gpu / 2**30, 3),
        **({} if measures.mixed_precision is None else {"mixed_precision": measures.mixed_precision}),
        **({} if (experts := coverage(job.family, result.layer_info)) is None else {"experts": experts}),
        "estimate": measures.estimate,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({job.threads} used), torch {torch.__version__}"
                   f", {where}",
    }
    return _w8a8_calibrated_report(config, job, report) if config.w8a8_calibrated else report
