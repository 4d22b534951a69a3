"""Running quantized checkpoints: the QuantLinear module and ``load``.

QuantLinear holds the packed tensors exactly as they are on disk and computes ``x @ dequantize(W)^T`` (the torch
reference path; the dequantized weight is cached after the first call).
"""

from __future__ import annotations

import copy
import pathlib

import torch
import torch.nn.functional as F

from qvlquant.checkpoint.qconfig import (
    CheckpointQuant,
    describe_spec,
    read_quantization_config,
)
from qvlquant.engine.skeleton import build_skeleton, load_processor, resolve_model_path
from qvlquant.engine.streaming import find_stored
from qvlquant.families import family_for
from qvlquant.quant.formats import Fp8Format, Int8Format, Nvfp4Format, PackFormat, QuantizedWeight
from qvlquant.runtime.fp8 import fp8_linear_targets, share_fused_scales, swap_in_fp8_linears
from qvlquant.runtime.nvfp4 import nvfp4_linear_targets, swap_in_nvfp4_linears
from qvlquant.runtime.swap import replace_linears
from qvlquant.runtime.w8a8 import swap_in_w8a8_linears, w8a8_linear_targets
from qvlquant.quant.spec import QuantSpec
from qvlquant.storage.manifest import verify_manifest
from qvlquant.storage.shards import DTYPES, EXPORT_DTYPES, ShardReader


class QuantLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, fmt: PackFormat, bias: bool, dtype):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.fmt = in_features, out_features, spec, fmt
        self.tensor_names = tuple(fmt.tensor_shapes(in_features, out_features, spec))
        for name, (shape, dt) in fmt.tensor_shapes(in_features, out_features, spec).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._dequantized: torch.Tensor | None = None
        self._act_order: bool | None = None

    @classmethod
    def from_weight(cls, w: QuantizedWeight, fmt: PackFormat, bias: torch.Tensor | None) -> "QuantLinear":
        n, k = w.q.shape
        dtype = bias.dtype if bias is not None else torch.float32
        module = cls(k, n, w.spec, fmt, bias is not None, dtype)
        for name, t in fmt.pack(w).items():
            getattr(module, name).copy_(t)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {name: getattr(self, name) for name in self.tensor_names}
        return self.fmt.unpack(tensors, self.spec, self.in_features)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized, self._act_order = None, None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.fmt is not PackFormat.COMPRESSED and self.spec.bits in (4, 8):
            return self._fused(x)
        if self._dequantized is None or self._dequantized.dtype != x.dtype or self._dequantized.device != x.device:
            self._dequantized = self.quantized_weight().dequantize().to(device=x.device, dtype=x.dtype)  # [N, K]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._dequantized, bias)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton dequant-matmul kernel (CUDA): reads the packed weight, never a dequantized copy."""
        from qvlquant.kernels.dequant_matmul import dequant_matmul_op, has_act_order

        g_idx = getattr(self, "g_idx", None)
        if self._act_order is None:
            self._act_order = has_act_order(g_idx, self.spec, self.in_features)
        return dequant_matmul_op(x, self.qweight, self.scales, self.qzeros, g_idx, self.bias, self.fmt.value,
                                 self.spec.bits, self.spec.group_size, self.spec.sym, self.in_features, self._act_order)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, group={self.spec.group_size}, {self.fmt.value}"


def read_safetensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or an index of shards), for small checkpoints and tests;
    pickle files are refused. ``load`` reads one tensor at a time instead."""
    reader = ShardReader(folder)
    return {k: reader.get(k) for k in reader.keys()}


def quant_linear_specs(reader: ShardReader, family, quant: CheckpointQuant) -> dict[str, QuantSpec]:
    """Runtime path -> setting of every linear the checkpoint holds packed (``CheckpointQuant.spec_for``: a mixed
    checkpoint gives each its own). A packed linear the config leaves unquantized, or a decoder-layer linear held
    as a plain weight that the config quantizes, is an error: transformers and vLLM would read it wrongly."""
    marker = ".weight_packed" if quant.pack_format is PackFormat.COMPRESSED else ".qweight"
    specs = {}
    for key in sorted(reader.keys()):
        if key.endswith(marker):
            name = family.to_runtime(key)[: -len(marker)]
            specs[name] = quant.spec_for(name)
            if specs[name] is None:
                raise ValueError(f"{reader.folder}: {key} is packed, but config.json's quantization_config leaves "
                                 f"{name} unquantized: the config does not describe these tensors")
        elif key.endswith(".weight") and _is_decoder_linear(name := family.to_runtime(key)[: -len(".weight")], family):
            if quant.spec_for(name) is not None:
                raise ValueError(f"{reader.folder}: {key} is a plain weight, but config.json's quantization_config "
                                 f"quantizes {name} ({describe_spec(quant.spec_for(name))}): add it to the config's "
                                 "unquantized modules, or re-export")
    return specs


def _is_decoder_linear(name: str, family) -> bool:
    return family.is_layer_key(name) and name.endswith(tuple("." + leaf for leaf in family.linears))


def swap_in_quant_linears(model, specs: dict[str, QuantSpec], fmt: PackFormat, dtype):
    """Replace the nn.Linear at each runtime path in ``specs`` by an empty QuantLinear of its setting (the
    checkpoint fills it)."""
    replace_linears(model, specs, lambda name, old: QuantLinear(old.in_features, old.out_features, specs[name], fmt,
                                                                 old.bias is not None, dtype))


def fill_from_checkpoint(model, reader: ShardReader, family, device: torch.device) -> None:
    """Give every parameter and persistent buffer of ``model`` its checkpoint tensor, one at a time, straight in
    the dtype the module declares and on ``device`` (no float32 copy of the model on the way). A tied lm_head
    is tied afterwards; the family's ``carried`` tensors are left on disk; any other missing or unexpected tensor is
    an error naming it."""
    state = model.state_dict(keep_vars=True)
    found = {name: find_stored(reader, family, name) for name in state}  # a base of fused experts: each one's slice
    expected = {name: stored for name, stored in found.items() if stored is not None}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [n for n in state if n not in expected and not (tied and n == f"{family.lm_head}.weight")]
    carried = tuple(family.carried)  # kept for other loaders (Qwen3.5's MTP head: vLLM's speculative decoding)
    used = {stored.key for stored in expected.values()}
    unexpected = sorted(k for k in set(reader.keys()) - used if not (carried and k.startswith(carried)))
    if missing or unexpected:
        raise ValueError(f"{reader.folder}: checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, stored in expected.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if stored.shape != tuple(state[name].shape):  # a packed tensor of another setting than the config's
            raise ValueError(f"{reader.folder}: {stored} has shape {list(stored.shape)}, the model expects "
                             f"{list(state[name].shape)} (for a quantized linear: the bits / group_size config.json "
                             "gives it); the config does not describe these tensors")
        value = stored.read(reader).to(device=device, dtype=state[name].dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    if tied:
        model.tie_weights()


def load(path: str | pathlib.Path = "demo", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a BF16 or quantized (GPTQ / AWQ GEMM / compressed-tensors / FP8: ``runtime.fp8`` / INT8 W8A8:
    ``runtime.w8a8`` / NVFP4A16: ``runtime.nvfp4``) Qwen-VL checkpoint. -> (model, processor);
    the processor is None only for a folder that holds none (bare test checkpoints). The model is built on the
    meta device and each tensor read straight into ``dtype`` on ``device``: a quantized model holds its packed
    tensors, never a float copy of the whole model. Pickle checkpoints are refused."""
    from transformers import AutoConfig  # heavy; only when a model is loaded

    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder)
    family = family_for(config.model_type).bind(config)  # each layer's type, each expert's linears
    has_processor = any((folder / f).exists() for f in ("processor_config.json", "tokenizer_config.json"))
    processor = load_processor(folder, family) if has_processor else None
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if qc and not isinstance(qc, dict) else qc
    if qc:
        verify_manifest(folder)  # before anything is read from an edited export
    quant = read_quantization_config(qc, str(folder / "config.json"))
    fp8 = quant.pack_format if quant is not None and isinstance(quant.pack_format, Fp8Format) else None
    fp4 = quant.pack_format if quant is not None and isinstance(quant.pack_format, Nvfp4Format) else None
    reader = ShardReader(folder, dtypes=EXPORT_DTYPES if fp8 or fp4 else DTYPES)
    if quant is None:
        model = build_skeleton(config, family, dtype)
    else:
        bare = copy.deepcopy(config)
        del bare.quantization_config
        model = build_skeleton(bare, family, dtype)
        model.config.quantization_config = qc
        if fp8:
            swap_in_fp8_linears(model, fp8_linear_targets(reader.keys(), family, fp8), fp8, dtype)
        elif isinstance(quant.pack_format, Int8Format):
            swap_in_w8a8_linears(model, w8a8_linear_targets(reader.keys(), family), quant.pack_format, dtype)
        elif fp4:
            swap_in_nvfp4_linears(model, nvfp4_linear_targets(reader.keys(), family), fp4, dtype)
        else:
            swap_in_quant_linears(model, quant_linear_specs(reader, family, quant), quant.pack_format, dtype)
    fill_from_checkpoint(model, reader, family, torch.device(device))
    if fp8 is Fp8Format.TENSOR:  # one scale per fused layer, as vLLM serves it (a no-op on qvlquant's exports)
        share_fused_scales(model, family)
    return model.to(device).eval(), processor
