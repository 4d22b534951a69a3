"""Running quantized checkpoints: the QuantLinear module and ``load``.

QuantLinear holds the packed tensors exactly as they are on disk and computes ``x @ dequantize(W)^T`` (the torch
reference path; the dequantized weight is cached after the first call).
"""

from __future__ import annotations

import copy
import json
import pathlib

import torch
import torch.nn.functional as F

from qvlquant.families import family_for
from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import QuantSpec


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


def spec_from_config(qc: dict) -> tuple[QuantSpec, PackFormat]:
    method = qc.get("quant_method")
    if method == "gptq":
        return QuantSpec(int(qc["bits"]), int(qc["group_size"]), bool(qc.get("sym", True))), PackFormat.GPTQ
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"AWQ version {qc.get('version')!r} is not supported; only 'gemm'")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        return QuantSpec(bits, group, not qc.get("zero_point", True)), PackFormat.AWQ_GEMM
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized" or len(qc.get("config_groups", {})) != 1:
            raise ValueError("compressed-tensors checkpoints load here only as one pack-quantized config group")
        w = next(iter(qc["config_groups"].values()))["weights"]
        group = -1 if w.get("strategy") == "channel" else int(w["group_size"])
        return QuantSpec(int(w["num_bits"]), group, bool(w["symmetric"])), PackFormat.COMPRESSED
    raise ValueError(f"quant_method {method!r} is not supported; qvlquant loads 'gptq', 'awq' and 'compressed-tensors'")


def read_safetensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or an index of shards); pickle files are refused."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in files)
        if stray:
            raise ValueError(f"{folder}: {stray} are not in model.safetensors.index.json (mixed checkpoints?)")
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {pickles}: pickle checkpoints are refused)" if pickles else ""
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: shard {name} listed in the index is missing")
        tensors.update(load_file(str(folder / name)))
    return tensors


def swap_in_quant_linears(model, targets: list[str], spec: QuantSpec, fmt: PackFormat, dtype):
    """Replace the nn.Linear at each runtime path in ``targets`` by an empty QuantLinear."""
    for name in targets:
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        if not isinstance(old, torch.nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not a Linear: the checkpoint does not fit this model")
        setattr(parent, leaf, QuantLinear(old.in_features, old.out_features, spec, fmt, old.bias is not None, dtype))


def model_class(config):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText._model_mapping[type(config)]


def load(path: str | pathlib.Path = "demo", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a BF16 or quantized (GPTQ / AWQ GEMM) Qwen-VL checkpoint. -> (model, processor); the processor is None
    only for a folder that holds none (bare test checkpoints)."""
    from transformers import AutoConfig, AutoProcessor

    from qvlquant.export import verify_manifest
    from qvlquant.models import resolve_model_path

    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder)
    family = family_for(config.model_type)
    has_processor = any((folder / f).exists() for f in ("processor_config.json", "tokenizer_config.json"))
    processor = AutoProcessor.from_pretrained(folder) if has_processor else None
    qc = getattr(config, "quantization_config", None)
    if not qc:
        model = model_class(config).from_pretrained(folder, dtype=dtype).to(device).eval()
        return model, processor
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    verify_manifest(folder)
    spec, fmt = spec_from_config(qc)
    bare = copy.deepcopy(config)
    del bare.quantization_config
    model = model_class(bare)._from_config(bare, dtype=dtype)
    model.config.quantization_config = qc
    tensors = {family.to_runtime(k): v for k, v in read_safetensors(folder).items()}
    marker = ".weight_packed" if fmt is PackFormat.COMPRESSED else ".qweight"
    targets = sorted(k[: -len(marker)] for k in tensors if k.endswith(marker))
    swap_in_quant_linears(model, targets, spec, fmt, dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)  # copies cast to each parameter's dtype
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), processor
