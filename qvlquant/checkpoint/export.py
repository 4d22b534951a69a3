"""Writing quantized checkpoints: safetensors in the keys ``save_pretrained`` writes, a ``quantization_config`` the
loaders read, the processor without any truncation setting, a report, and a sha256 manifest.

The tensors are streamed: the export plans every shard from names, dtypes and shapes alone, then writes each file
one tensor at a time, fetching it from where it is: the finished layers' records (a ``MemoryStore`` or the
partial run on disk) and, for everything that is not quantized (vision tower, embeddings, norms, lm_head), the
base checkpoint's shards (``CheckpointTensors``) or a model in memory (``ModelTensors``), cast to the storage
dtype. Memory holds one tensor at a time. Everything is written into a temporary folder beside the output and
renamed into place at the end (``qvlquant.storage.outputs.publish``), so a crash never leaves a partial model and never
destroys the model that was there before.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import pathlib
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from qvlquant.checkpoint.card import write_card
from qvlquant.config import ExportConfig
from qvlquant.engine.loop import QuantResult
from qvlquant.engine.streaming import stored_tensor
from qvlquant.families import EXPERT, FAMILIES, ModelFamily
from qvlquant.parallel.devices import trim_heap
from qvlquant.quant.formats import (
    SCHEME_NAMES,
    Fp8Format,
    Int8Format,
    Nvfp4Format,
    PackFormat,
)
from qvlquant.quant.fp8 import BLOCK as FP8_BLOCK
from qvlquant.quant.rules import ModulePlan
from qvlquant.quant.spec import QuantConfig
from qvlquant.storage.manifest import MANIFEST, verify_manifest, write_manifest  # noqa: F401 (MANIFEST, verify re-exported)
from qvlquant.storage.outputs import publish, temp_dir
from qvlquant.storage.shards import INDEX, SINGLE, ShardReader, write_safetensors
from qvlquant.ui.progress import progress
from qvlquant.version import __version__

REPORT = "quantize_report.json"
Entry = tuple[str, torch.dtype, tuple[int, ...]]


def act_order_is_static(qcfg: QuantConfig) -> bool:
    """Whether act-order left the trivial g_idx (input column k in group k // group_size): with static groups, or
    per-channel, the group parameters are fixed on the original column order, so the packed weights are in that
    order and the checkpoint needs no act-order at load time (``desc_act: false``, compressed-tensors ``actorder:
    weight``), which is also the only act-order vLLM 0.33 still loads."""
    return qcfg.desc_act and (qcfg.static_groups or qcfg.spec.group_size == -1)


def compressed_weights(qcfg: QuantConfig) -> dict:
    """compressed-tensors' ``weights`` arguments of a config group for linears quantized by ``qcfg``."""
    spec = qcfg.spec
    return {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.sym, "dynamic": False,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size,
        # "weight": columns quantized in activation order, groups contiguous (no g_idx); the only act-order the
        # contiguous layout holds (the job config refuses act-order without static groups for this format)
        "actorder": "weight" if act_order_is_static(qcfg) else None, "observer": "minmax",
    }


def compressed_tensors_config(qcfg: QuantConfig, family: ModelFamily, mixed: list | None = None) -> dict:
    """compressed-tensors ``pack-quantized``: one config group for every targeted Linear; the vision tower and lm_head
    in ``ignore``. ``mixed`` (``mixed_settings``): a further group per other setting, targeting its linears by
    regex (a name target takes precedence over the class target "Linear"), and skipped linears in ``ignore``.
    Validated by ``compressed_tensors.QuantizationConfig`` where that library is installed (the interop / vllm
    extras), so a field it would reject never reaches a checkpoint; the plain dict otherwise."""
    group = lambda c, targets: {"targets": targets, "weights": compressed_weights(c),  # noqa: E731
                                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    groups = {"group_0": group(qcfg, ["Linear"])}
    ignore = compressed_tensors_ignore(family)
    for setting, patterns in mixed or ():
        if setting is None:
            ignore += [f"re:{p}" for p in patterns]
        else:
            groups[f"group_{len(groups)}"] = group(setting, [f"re:{p}" for p in patterns])
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    return {**validated_by_library(config), "meta": {"quantizer": f"qvlquant:{__version__}", "method": qcfg.method}}


def mixed_settings(family: ModelFamily, num_layers: int, modules: ModulePlan | None) -> list[tuple]:
    """The linears whose settings differ from the job's, as [(QuantConfig or None for skipped, [regex, ...])]: per
    setting, one regex per set of layers, naming those layers and the linears with vLLM's fused names beside them
    (for layers 3 and 5: ``.*[.]layers[.](?:3|5)[.](?:self_attn[.]q_proj|...|self_attn[.]qkv_proj)$``, dots
    escaped), so that it matches the runtime and checkpoint names of transformers, GPTQModel and vLLM alike
    (``re.match`` / ``re.search``). [] without rules."""
    if modules is None or not modules.mixed:
        return []
    head = family.decoder_layers.rsplit(".", 1)[-1]
    found: dict = {}  # setting -> {linear group: [layers]}, in the order first met
    for i in range(num_layers):
        for group in family.at(i).linear_groups:
            cfg = modules.config_for(f"{family.decoder_layers}.{i}.{group[0]}")
            if cfg != modules.default:
                found.setdefault(cfg, {}).setdefault(group, []).append(i)
    out = []
    for cfg, groups in found.items():
        by_layers: dict[tuple[int, ...], list[str]] = {}  # linear groups given this setting in the same layers
        for group, layers in groups.items():
            fused = [f for f in map(family.at(layers[0]).fused_name, group) if f]  # DeltaNet: in_proj_qkvz, _ba
            by_layers.setdefault(tuple(layers), []).extend(list(group) + fused)
        out.append((cfg, [rf".*\.{re.escape(head)}\.(?:{'|'.join(map(str, layers))})\."
                          rf"(?:{'|'.join(_name_patterns(family, names))})$" for layers, names in by_layers.items()]))
    return out


def _name_patterns(family: ModelFamily, names: list[str]) -> list[str]:
    """Regexes of ``names`` (linears of one layer, fused names beside them), each once. Where ``names`` holds every
    expert's copy of a linear (an MoE layer's experts, which vLLM runs as one layer of one setting), one pattern
    with the expert's index as ``\\d+`` stands for all of them."""
    experts: dict[str, set[int]] = {}
    for n in names:
        if family.expert_of(n) is not None:
            experts.setdefault(family.expert_template(n), set()).add(family.expert_of(n))
    whole = {t for t, seen in experts.items() if len(seen) == family.expert_count}
    out = []
    for n in names:
        template = family.expert_template(n)
        out.append(re.escape(template).replace(re.escape(EXPERT), r"\d+") if template in whole else re.escape(n))
    return list(dict.fromkeys(out))


def compressed_tensors_ignore(family: ModelFamily) -> list[str]:
    """compressed-tensors ``ignore`` of every export (W4 ``pack-quantized``, and the FP8, INT8 W8A8 and NVFP4
    schemes): the family's (``compressed_ignore``) and the modules carried unquantized (``carried_patterns``):
    vLLM's MTP drafter builds Qwen3.5's MTP head with the checkpoint's config, whose group targets every Linear."""
    return family.compressed_ignore() + [f"re:{p}" for p in carried_patterns(family)]


def carried_patterns(family: ModelFamily) -> list[str]:
    """Regexes of the modules the export carries unquantized from the base (Qwen3.5's ``mtp.``): vLLM builds its
    MTP head from the export for speculative decoding, and GPTQ's ``modules_in_block_to_quantize`` entries
    (``layers.0.mlp.gate_proj``) are substrings of its names (``mtp.layers.0.mlp.gate_proj``)."""
    return [rf".*{re.escape(p)}.*" for p in family.carried]


def gptq_dynamic(mixed: list[tuple]) -> dict:
    """GPTQModel's ``dynamic`` (vLLM reads it): ``-:regex`` skips, ``+:regex`` overrides bits / group_size / sym /
    desc_act; first match wins."""
    dynamic = {}
    for cfg, patterns in mixed:
        for p in patterns:
            if cfg is None:
                dynamic[f"-:{p}"] = {}
            else:
                dynamic[f"+:{p}"] = {"bits": cfg.spec.bits, "group_size": cfg.spec.group_size, "sym": cfg.spec.sym,
                                     "desc_act": cfg.desc_act and not act_order_is_static(cfg)}
    return dynamic


def validated_by_library(config: dict) -> dict:
    """``config`` as ``compressed_tensors.QuantizationConfig`` validates and writes it (a pydantic ValidationError
    naming the field otherwise); ``config`` unchanged when compressed-tensors is not installed."""
    try:
        from compressed_tensors import (
            QuantizationConfig,  # optional: the interop / vllm extras install it
        )
    except ImportError:
        return config
    return QuantizationConfig.model_validate(config).model_dump(mode="json")


# The weights and input_activations of llm-compressor's calibrated presets, as compressed-tensors' PRESET_SCHEMES
# defines them and writes them (0.17 / 0.20: fields it fills by default are left out, so no observer on the weights)
FP8_STATIC_ARGS = (
    {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False},
    {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False,
     "observer": "static_minmax"},
)
NVFP4_W4A4_ARGS = (
    {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
     "dynamic": False, "scale_dtype": "float8_e4m3fn"},
    {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
     "dynamic": "local", "scale_dtype": "float8_e4m3fn", "observer": "static_minmax"},
)


def _compressed_tensors_config(fmt: str, weights: dict, activations: dict | None, family: ModelFamily,
                               meta: dict) -> dict:
    """A compressed-tensors ``quantization_config`` of one group over every Linear in format ``fmt`` with these
    weight / input-activation arguments, the family's ignore list and qvlquant's ``meta``, validated by the
    library where it is installed."""
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": fmt}},
        "ignore": compressed_tensors_ignore(family),
        "kv_cache_scheme": None,
    }
    return {**validated_by_library(config), "meta": meta}


def fp8_quantization_config(fmt: Fp8Format, family: ModelFamily, not_converted: list[str]) -> dict:
    """The ``quantization_config`` of an FP8 export. ``BLOCK``: Qwen's official FP8 checkpoints' (``quant_method:
    fp8``; vLLM's ``Fp8Config`` and transformers' ``FineGrainedFP8Config``); ``not_converted``: the modules kept in
    full precision, each named whole (vLLM matches them exactly). ``CHANNEL``: compressed-tensors
    ``float-quantized``, llm-compressor's FP8_DYNAMIC scheme; ``TENSOR``: the same format, its FP8 preset (per-tensor
    weights, static per-tensor input activations)."""
    meta = {"quantizer": f"qvlquant:{__version__}", "method": "fp8", "scheme": SCHEME_NAMES[fmt]}
    if fmt is Fp8Format.BLOCK:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": not_converted, "meta": meta}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel",
               "group_size": None, "observer": "minmax"}
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token",
                   "group_size": None, "observer": None}
    if fmt is Fp8Format.TENSOR:
        weights, activations = (dict(args) for args in FP8_STATIC_ARGS)
    return _compressed_tensors_config("float-quantized", weights, activations, family, meta)


def w8a8_quantization_config(fmt: Int8Format, family: ModelFamily, calibrated: dict | None = None) -> dict:
    """The ``quantization_config`` of an INT8 W8A8 export: compressed-tensors ``int-quantized``, llm-compressor's
    W8A8 preset (int8 weights per channel, symmetric; int8 input activations per token, dynamic, symmetric).
    ``calibrated``: what the calibrated path did ({"method": "gptq", "smoothing_strength": ...}), added to ``meta``
    (the layout and what loaders read are the data-free export's)."""
    meta = {"quantizer": f"qvlquant:{__version__}", "method": "int8", "scheme": SCHEME_NAMES[fmt], **(calibrated or {})}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel",
               "group_size": None, "observer": "minmax"}
    activations = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                   "group_size": None, "observer": None}
    return _compressed_tensors_config("int-quantized", weights, activations, family, meta)


def nvfp4_quantization_config(fmt: Nvfp4Format, family: ModelFamily) -> dict:
    """The ``quantization_config`` of an NVFP4 export: compressed-tensors ``nvfp4-pack-quantized``, 4-bit float
    weights in groups of 16 with e4m3 scales under a per-tensor global scale (strategy ``tensor_group``), symmetric,
    as llm-compressor's NVFP4A16 preset writes it, with no input_activations (weight-only); or as its NVFP4 preset
    writes it (``W4A4``), with input activations of the same grid whose global scale is calibrated and group scales
    dynamic (``dynamic: local``). The vision tower and lm_head ignored."""
    meta = {"quantizer": f"qvlquant:{__version__}", "method": "nvfp4", "scheme": SCHEME_NAMES[fmt]}
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor_group",
               "group_size": 16, "observer": "minmax", "scale_dtype": "float8_e4m3fn"}
    activations = None
    if fmt is Nvfp4Format.W4A4:
        weights, activations = (dict(args) for args in NVFP4_W4A4_ARGS)
    return _compressed_tensors_config("nvfp4-pack-quantized", weights, activations, family, meta)


def modules_in_block_to_quantize(family: ModelFamily, num_layers: int,
                                 modules: ModulePlan | None = None) -> list[list[str]]:
    """GPTQ's list of quantized linears, one group per layer and linear group, each named from the decoder-layer
    list on (``layers.3.mlp.gate_proj``). Short names (``mlp.gate_proj``) are not enough: vLLM treats every linear
    whose name contains one as GPTQ-quantized, and Qwen2.5-VL's vision MLP has those names too (bf16 weights built
    as GPTQ layers). ``layers.N.`` occurs in no vision tower name; optimum matches these as suffixes of its runtime
    names (``model.language_model.layers.3.mlp.gate_proj``) and vLLM as substrings of its own
    (``language_model.model.layers.3.mlp.gate_up_proj``'s shards)."""
    head = family.decoder_layers.rsplit(".", 1)[-1]
    skipped = lambda i, g: modules is not None and modules.config_for(f"{family.decoder_layers}.{i}.{g[0]}") is None  # noqa: E731
    return [[f"{head}.{i}.{name}" for name in group + unmapped_fused_of(family.at(i), group)]
            for i in range(num_layers) for group in family.at(i).linear_groups if not skipped(i, group)]


def unmapped_fused_of(layer: ModelFamily, group: tuple[str, ...]) -> tuple[str, ...]:
    """The fused layers vLLM builds of the linears of ``group`` without telling its quantization config
    (``family.unmapped_fused``): GPTQ's list names them too (``layers.1.mlp.gate_up_proj``), since vLLM then
    matches the fused name itself against the list, and an entry no loaded module ends with changes nothing in
    optimum / transformers."""
    return tuple(fused for fused, parts in layer.fused if fused in layer.unmapped_fused and set(parts) <= set(group))


def kept_linears(family: ModelFamily, num_layers: int) -> list[str]:
    """The family's ``kept`` linears (routers) as AWQ's ``modules_to_not_convert`` names them: the bare name
    (``mlp.gate``) unless it is part of a linear's name in some layer (Qwen3-VL-MoE's dense ``mlp.gate_proj``; vLLM
    matches the list as substrings, and builds that layer's ``mlp.gate_up_proj``), then one entry per layer whose
    linears it is part of none of (``layers.0.mlp.gate``)."""
    head = family.decoder_layers.rsplit(".", 1)[-1]
    out = []
    for name in family.kept:
        clash = {i for i in range(num_layers) if any(name in n for n in family.at(i).linears)}
        out += [f"{head}.{i}.{name}" for i in range(num_layers) if i not in clash] if clash else [name]
    return out


def skipped_linears(family: ModelFamily, num_layers: int, modules: ModulePlan | None) -> list[str]:
    """Linears a rule skipped, named from the decoder-layer list on (``layers.3.mlp.down_proj``): a suffix of
    transformers' runtime names and a substring of vLLM's, as AWQ's ``modules_to_not_convert`` is matched; then
    ``skipped_expert_layers``."""
    if modules is None:
        return []
    head = family.decoder_layers.rsplit(".", 1)[-1]
    return [f"{head}.{i}.{n}" for i in range(num_layers) for n in family.at(i).linears
            if modules.config_for(f"{family.decoder_layers}.{i}.{n}") is None] + \
        skipped_expert_layers(family, num_layers, modules)


def skipped_expert_layers(family: ModelFamily, num_layers: int, modules: ModulePlan | None) -> list[str]:
    """``layers.3.mlp.experts`` for each MoE layer whose experts a rule skips: vLLM's AWQ matches its one MoE layer
    by that name in ``modules_to_not_convert`` (which holds no expert's name), also where it falls back to MoeWNA16.
    (GPTQ's MoeWNA16 fallback reads no skip at all: ``checkpoint.vllm`` says so.)"""
    if modules is None or not family.experts:
        return []
    head = family.decoder_layers.rsplit(".", 1)[-1]
    out = []
    for i in range(num_layers):
        experts = [n for n in family.at(i).linears if family.expert_of(n) is not None]
        if experts and all(modules.config_for(f"{family.decoder_layers}.{i}.{n}") is None for n in experts):
            out.append(f"{head}.{i}.{family.experts}")
    return out


def quantization_config(qcfg: QuantConfig, fmt: PackFormat, family: ModelFamily, num_layers: int,
                        modules: ModulePlan | None = None) -> dict:
    """The ``quantization_config`` loaders read for the format the tensors were packed in (``num_layers``: the
    model's decoder layers; ``modules``: per-module rules, written as GPTQ ``dynamic``, compressed-tensors
    config groups and ``ignore``, or AWQ ``modules_to_not_convert``)."""
    spec = qcfg.spec
    not_converted = family.not_converted_names()  # for transformers and for vLLM
    mixed = mixed_settings(family, num_layers, modules)
    if fmt is PackFormat.COMPRESSED:
        return compressed_tensors_config(qcfg, family, mixed)
    if fmt is PackFormat.AWQ_GEMM:
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "zero_point": not spec.sym,
            "modules_to_not_convert": not_converted + [p.rstrip(".") for p in family.carried]
                                      + kept_linears(family, num_layers) + skipped_linears(family, num_layers, modules),
        }
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        # act-order with static groups leaves g_idx trivial: written as plain groups, which vLLM loads (it refuses
        # desc_act: true); meta says act-order ran
        "desc_act": qcfg.desc_act and not act_order_is_static(qcfg),
        "static_groups": qcfg.static_groups,
        "true_sequential": qcfg.true_sequential,
        # what was asked (the damping each layer used is in quantize_report.json); RTN has none, and transformers'
        # GPTQConfig refuses a null, so the key is left out
        "damp_percent": qcfg.damp_percent,
        "pack_dtype": "int32",
        "modules_in_block_to_quantize": modules_in_block_to_quantize(family, num_layers, modules),
        "modules_to_not_convert": not_converted,
        "meta": {"quantizer": [f"qvlquant:{__version__}"], "method": qcfg.method, "act_order": qcfg.desc_act},
    }
    # vLLM keeps its MTP layers unquantized when a "-:" rule names mtp (qwen3_5_mtp.py)
    dynamic = {f"-:{p}": {} for p in carried_patterns(family)} | gptq_dynamic(mixed)
    if dynamic:
        config["dynamic"] = dynamic
    return {k: v for k, v in config.items() if not (k == "damp_percent" and v is None)}


class ModelTensors:
    """The tensors of a model in memory (non-layer parts), in the storage dtype."""

    def __init__(self, model, family: ModelFamily, dtype: torch.dtype):
        self.state, self.family, self.dtype = model.state_dict(), family, dtype

    def meta(self, runtime_name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.state[runtime_name]
        return (self.dtype if t.is_floating_point() else t.dtype), tuple(t.shape)

    def get(self, runtime_name: str) -> torch.Tensor:
        t = self.state[runtime_name]
        return finite((t.to(self.dtype) if t.is_floating_point() else t).contiguous(), runtime_name)

    def carried(self) -> list[str]:
        return []  # a model in memory has no checkpoint keys besides its own


class CheckpointTensors:
    """The tensors of the base checkpoint on disk, read one at a time and cast to the storage dtype."""

    def __init__(self, reader: ShardReader, family: ModelFamily, dtype: torch.dtype):
        self.reader, self.family, self.dtype = reader, family, dtype
        self._order: collections.deque[str] = collections.deque()  # read_ahead's names still to come
        self._pending: tuple[str, Future] | None = None
        self._reader: ThreadPoolExecutor | None = None

    def meta(self, runtime_name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        stored = stored_tensor(self.reader, self.family, runtime_name)
        return (self.dtype if stored.dtype.is_floating_point else stored.dtype), stored.shape

    def get(self, runtime_name: str) -> torch.Tensor:
        if self._pending is not None and self._pending[0] == runtime_name:
            future = self._pending[1]
            self._read_next()
            return future.result()  # its read's error, if it failed
        return self._read(runtime_name)

    def _read(self, runtime_name: str) -> torch.Tensor:
        stored = stored_tensor(self.reader, self.family, runtime_name)  # an expert of fused ones: its slice
        t = stored.read(self.reader)
        return finite(t.to(self.dtype) if t.is_floating_point() else t, f"{self.reader.folder}: {stored}")

    @contextlib.contextmanager
    def read_ahead(self, runtime_names: list[str]):
        """Within the block, ``runtime_names`` (the order in which ``get`` will ask for them) are read one ahead in
        a background thread: the next one is read from disk while the caller works on this one (in a data-free
        export, rounds and packs it). Memory holds one tensor more; a name asked for out of turn is read then."""
        self._order = collections.deque(runtime_names)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        try:
            self._read_next()
            yield self
        finally:
            self._order, self._pending = collections.deque(), None
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None

    def _read_next(self) -> None:
        self._pending = None
        if self._order:
            name = self._order.popleft()
            self._pending = (name, self._reader.submit(self._read, name))

    def carried(self) -> list[str]:
        """The checkpoint keys under the family's ``carried`` prefixes (Qwen3.5's MTP head), which the model does
        not load: the export copies them as they are (``raw``)."""
        prefixes = self.family.carried
        return [key for key in self.reader.keys() if prefixes and key.startswith(prefixes)]

    def raw_meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.reader.meta(key)

    def raw(self, key: str) -> torch.Tensor:
        return self.reader.get(key)


FINITE_CHUNK = 1 << 24  # elements counted at a time when a tensor is not finite (isfinite's temporaries)


def finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t``, when it holds no NaN or infinity: the tensors copied unquantized into an export (the final norm, an
    embedding row no calibration token used, the vision tower) are checked here, where every one of them passes,
    since nothing else reads all of them. Checked by the largest and smallest value, into which a NaN or an
    infinity propagates: no temporaries (``isfinite`` on a whole embedding table, 1 GB in bf16 at Qwen3.5's
    vocabulary, had tripled a data-free run's peak memory) and 12x faster on a bf16 CPU tensor, where ``isfinite``
    works in float32 (it was 79 of a 7B RTN export's 221 s). The bad values are counted ``FINITE_CHUNK`` at a time."""
    if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin())):
        return t
    flat = t.reshape(-1)
    chunks = [flat[i:i + FINITE_CHUNK] for i in range(0, flat.numel(), FINITE_CHUNK)]
    bad = sum(int((~torch.isfinite(c)).sum()) for c in chunks)
    raise ValueError(f"{name} holds NaN or infinite values ({bad} of {t.numel()}); the base model is damaged "
                     "(re-download it); nothing was exported")


def plan_tensors(model, result: QuantResult, base) -> tuple[list[Entry], dict[str, Callable[[], torch.Tensor]]]:
    """Every tensor of the export in state-dict order (a layer's packed tensors where its weights were), with a
    function fetching each. ``model`` may be a meta skeleton: only its names are read."""
    family = result.plan.family
    quantized = set(family.linears)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    entries: list[Entry] = []
    fetch: dict[str, Callable[[], torch.Tensor]] = {}
    layers_done = set()
    for name in model.state_dict().keys():
        if family.is_layer_key(name):
            i = int(name[len(family.decoder_layers) + 1:].split(".", 1)[0])
            if i not in layers_done:
                layers_done.add(i)
                _plan_layer(i, model, result, quantized, entries, fetch)
            continue
        if tied and name == f"{family.lm_head}.weight":
            continue
        key = family.to_disk(name)
        entries.append((key, *base.meta(name)))
        fetch[key] = lambda name=name: base.get(name)
    for key in base.carried():  # after the model's own tensors, in the checkpoint's order, dtype and bytes
        entries.append((key, *base.raw_meta(key)))
        fetch[key] = lambda key=key: base.raw(key)
    return entries, fetch


def _plan_layer(i: int, model, result: QuantResult, quantized: set, entries: list, fetch: dict) -> None:
    family, store = result.plan.family, result.store
    prefix = f"{family.decoder_layers}.{i}"
    meta = store.tensor_meta(i)
    ordered = []
    for key in model.get_submodule(prefix).state_dict().keys():
        module, leaf = key.rsplit(".", 1)
        disk = family.to_disk(f"{prefix}.{key}")
        if module in quantized and leaf == "weight":
            head = disk[: -len(".weight")] + "."
            ordered += [k for k in meta if k.startswith(head) and "." not in k[len(head):] and k != head + "bias"]
        else:
            ordered.append(disk)
    if sorted(ordered) != sorted(meta):
        raise ValueError(f"{prefix}: its record holds {sorted(set(meta) - set(ordered))[:4]} and lacks "
                         f"{sorted(set(ordered) - set(meta))[:4]}; the partial run does not match this model")
    for key in ordered:
        entries.append((key, *meta[key]))
        fetch[key] = lambda key=key: store.get(i, key)


def plan_shards(entries: list[Entry], max_shard_bytes: int | None) -> list[list[Entry]]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (one shard when it all fits)."""
    size = lambda e: torch.tensor([], dtype=e[1]).element_size() * int(torch.Size(e[2]).numel())  # noqa: E731
    if max_shard_bytes is None or sum(size(e) for e in entries) <= max_shard_bytes:
        return [entries]
    shards: list[list[Entry]] = [[]]
    used = 0
    for e in entries:  # state-dict order keeps a layer's tensors together
        if shards[-1] and used + size(e) > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += size(e)
    return shards


# Bytes written between two hand-backs of freed heap memory: a data-free export's thousands of small quantization
# temporaries (MoE experts) come from glibc's heap, whose freed blocks stayed counted in the process (measured on two
# Qwen3.5-35B-A3B layers: 0.8 GiB growing to 2.3 GiB before the embeddings were copied)
TRIM_EVERY_BYTES = 256 * 2**20


def write_shards(entries: list[Entry], fetch: dict, folder: pathlib.Path, max_shard_bytes: int | None) -> list[str]:
    """``model.safetensors``, or shards with a ``model.safetensors.index.json`` in the layout transformers writes,
    one tensor in memory at a time, freed heap handed back every ``TRIM_EVERY_BYTES``. -> the file names written."""
    shards = plan_shards(entries, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    bar = progress(total=len(entries), iterable=None, desc="export", unit="tensor")
    weight_map, total = {}, 0
    sizes = {e[0]: torch.tensor([], dtype=e[1]).element_size() * int(torch.Size(e[2]).numel()) for e in entries}
    since_trim = 0

    def fetched(key):
        nonlocal since_trim
        bar.update(1)
        since_trim += sizes[key]
        if since_trim >= TRIM_EVERY_BYTES:
            trim_heap()
            since_trim = 0
        return fetch[key]()

    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, fetched, {"format": "pt"})
        weight_map.update({e[0]: name for e in shard})
        total += sum(torch.tensor([], dtype=e[1]).element_size() * int(torch.Size(e[2]).numel()) for e in shard)
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _strip_truncation(folder: pathlib.Path) -> None:
    """vLLM fails on a tokenizer.json that carries calibration truncation; none is ever saved."""
    path = folder / "tokenizer.json"
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("truncation") is not None:
            data["truncation"] = None
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


# Files of the base model that serving stacks read besides the weights, the config and what the processor saves:
# sampling defaults (vLLM and transformers' generate read generation_config.json), chat templates, the image and
# video processors' settings. Each one the export does not already hold is copied from the base, byte for byte.
SERVING_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.json")


def carry_serving_files(base_folder: pathlib.Path, folder: pathlib.Path) -> list[str]:
    """Copy the base's ``SERVING_FILES`` that ``folder`` lacks (regular files only). -> the names copied."""
    copied = []
    for name in SERVING_FILES:
        src = base_folder / name
        if (folder / name).exists() or not src.is_file():  # is_file follows the hub cache's links to its blobs
            continue
        shutil.copyfile(src, folder / name)
        copied.append(name)
    return copied


def export(model, processor, result: QuantResult, out: str | os.PathLike, report: dict | Callable[[], dict],
           base=None, options: ExportConfig = ExportConfig(), base_folder: pathlib.Path | None = None,
           files: dict[str, str] | None = None) -> pathlib.Path:
    """Write the quantized checkpoint of ``result`` to ``out``. ``model``: the model quantized (or its meta
    skeleton, with ``base`` reading the checkpoint); ``base``: where the tensors that are not quantized come from
    (default: ``model`` itself); ``report``: a dict, or a function making it once the tensors are written (so
    the peak memory it records covers the export); ``options.protected``: paths the output may never replace;
    ``base_folder``: the base checkpoint's folder, whose ``SERVING_FILES`` the export carries over; ``files``: further
    text files by name (the sensitivity search's recipe), written with the rest and listed in the manifest."""
    plan = result.plan
    if not result.complete:
        raise ValueError(f"only layers {result.store.finished()} of {result.num_layers} are quantized")
    base = base or ModelTensors(model, plan.family, plan.storage_dtype)
    tmp = temp_dir(out)
    try:
        entries, fetch = plan_tensors(model, result, base)
        write_shards(entries, fetch, tmp, options.max_shard_bytes)
        config = copy.deepcopy(model.config)
        if isinstance(plan.pack_format, Int8Format):  # calibrated W8A8: the data-free export's layout and config
            smoothing = "off" if plan.smoothing is None else plan.smoothing
            config.quantization_config = w8a8_quantization_config(plan.pack_format, plan.family, {
                "method": plan.qcfg.method, "smoothing_strength": smoothing})
        else:
            config.quantization_config = quantization_config(plan.qcfg, plan.pack_format, plan.family,
                                                             result.num_layers, plan.modules)
        config.dtype = str(plan.storage_dtype).removeprefix("torch.")
        return finish_export(tmp, config, processor, base_folder, report, out, options, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def with_serving_fields(config):
    """A copy of ``config`` whose text config holds the family's ``serving_fields`` that it lacks, at the value that
    does what transformers does (Qwen3-VL-MoE: ``norm_topk_prob`` true, which vLLM 0.33 reads and transformers'
    config class does not have); ``config`` itself when nothing is missing."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    text = getattr(config, "text_config", None) or config
    missing = [(k, v) for k, v in (family.serving_fields if family else ()) if k not in text.to_dict()]
    if not missing:
        return config
    config = copy.deepcopy(config)
    for key, value in missing:
        setattr(getattr(config, "text_config", None) or config, key, value)
    return config


def finish_export(tmp: pathlib.Path, config, processor, base_folder: pathlib.Path | None,
                  report: dict | Callable[[], dict], out: str | os.PathLike, options: ExportConfig,
                  files: dict[str, str] | None = None) -> pathlib.Path:
    """Everything an export holds beside its tensors, written into ``tmp`` (the weights already there): config.json,
    the processor, the base's serving files, ``files`` (name -> text), the report, the card and the manifest; then
    ``tmp`` published as ``out``. -> the published folder. Every sub-config (text, vision) states ``config.dtype``,
    the dtype the export stores, not the dtype the model was computed in."""
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None and hasattr(getattr(config, sub), "dtype"):
            getattr(config, sub).dtype = config.dtype
    with_serving_fields(config).save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    if base_folder is not None:
        carry_serving_files(pathlib.Path(base_folder), tmp)
    _strip_truncation(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    report = report() if callable(report) else report
    (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_card(tmp, report, pathlib.Path(out).name)  # README.md, listed in the manifest
    write_manifest(tmp)
    return publish(tmp, out, options.overwrite, options.protected)
