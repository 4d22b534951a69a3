"""Filling a meta skeleton (``qvlquant.engine.skeleton``) from the safetensors shards one part at a time: the vision
tower and embeddings for the capture pass, then one decoder layer at a time (``StreamedLayers``); and ``load_base``,
the whole model in memory for small models. ``find_stored`` says where the checkpoint holds each parameter: its own
tensor, or one expert's slice of a tensor holding a layer's experts fused (read one expert at a time)."""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from qvlquant.engine.skeleton import (
    build_skeleton,
    check_processor_files,
    check_remote_code,
    config_sizes,
    load_config,
    load_processor,
    read_model_type,
    resolve_model_path,
    storage_dtype,
)
from qvlquant.engine.experts import expert_weight, fused_layout
from qvlquant.engine.transforms import pad_layer
from qvlquant.families import ExpertSlice, ModelFamily, family_for
from qvlquant.parallel.devices import trim_heap
from qvlquant.storage.shards import NAMES, ShardReader


def find_disk_key(reader: ShardReader, family: ModelFamily, runtime_name: str) -> str | None:
    """The checkpoint key of a runtime parameter name, in either layout (save_pretrained's or the runtime one);
    None when the checkpoint holds neither."""
    return next((key for key in (family.to_disk(runtime_name), runtime_name) if key in reader), None)


def disk_key(reader: ShardReader, family: ModelFamily, runtime_name: str) -> str:
    """``find_disk_key`` for a tensor that must be there: a KeyError naming the folder and the keys tried."""
    key = find_disk_key(reader, family, runtime_name)
    if key is None:
        raise KeyError(f"{reader.folder}: no tensor for {runtime_name} (looked for {family.to_disk(runtime_name)!r})")
    return key


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where the checkpoint holds one runtime parameter: the tensor ``key``, or, for an expert linear's weight in a
    checkpoint of fused experts (``family.fused_experts``), ``where`` in expert ``expert``'s entry of ``key``
    (``transposed``: stored [E, in, out]). ``dtype`` and ``shape`` are the parameter's as read."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    expert: int | None = None
    where: ExpertSlice | None = None
    transposed: bool = False

    def __str__(self) -> str:
        if self.expert is None:
            return self.key
        return f"{self.key}[{self.expert}] (part {self.where.part + 1} of {self.where.parts})"

    def read(self, reader: ShardReader) -> torch.Tensor:
        """The tensor, fresh; an expert's weight reads only its expert's entry of the fused tensor."""
        if self.expert is None:
            return reader.get(self.key)
        return expert_weight(reader.get_rows(self.key, [self.expert])[0], self.where, self.transposed)


def find_stored(reader: ShardReader, family: ModelFamily, runtime_name: str) -> Stored | None:
    """Where the checkpoint holds the runtime parameter ``runtime_name`` (``find_disk_key``, else an expert linear's
    slice of the layer's fused expert tensors); None when it holds it nowhere. A fused tensor of fewer experts than
    the name's, or of shapes no reading fits (``fused_layout``), is a ValueError naming the file and tensor."""
    key = find_disk_key(reader, family, runtime_name)
    if key is not None:
        return Stored(key, *reader.meta(key))
    if not family.fused_experts or not runtime_name.endswith(".weight") or not family.is_layer_key(runtime_name):
        return None
    index, _, linear = runtime_name[len(family.decoder_layers) + 1: -len(".weight")].partition(".")
    e, leaf = family.expert_of(linear), linear.rpartition(".")[2]
    if e is None or leaf not in family.expert_linears or linear != f"{family.experts}.{e}.{leaf}":
        return None
    head = f"{family.decoder_layers}.{index}.{family.experts}"
    keys = {s.tensor: find_disk_key(reader, family, f"{head}.{s.tensor}") for s in family.fused_experts}
    if None in keys.values():
        return None
    shapes = {tensor: reader.meta(key)[1] for tensor, key in keys.items()}
    transposed = fused_layout(family.fused_experts, shapes, f"{reader.folder}: {family.to_disk(head)}")
    where = family.fused_experts[family.expert_linears.index(leaf)]
    key = keys[where.tensor]
    dtype, (count, *matrix) = reader.meta(key)
    if e >= count:
        raise ValueError(f"{reader.folder}: {key} holds {count} experts; config.json gives the model more "
                         f"({runtime_name})")
    rows, cols = reversed(matrix) if transposed else matrix
    return Stored(key, dtype, (rows // where.parts, cols), e, where, transposed)


def stored_tensor(reader: ShardReader, family: ModelFamily, runtime_name: str) -> Stored:
    """``find_stored`` for a parameter that must be there: a KeyError naming the folder and the key looked for."""
    stored = find_stored(reader, family, runtime_name)
    if stored is None:
        raise KeyError(f"{reader.folder}: no tensor for {runtime_name} (looked for {family.to_disk(runtime_name)!r})")
    return stored


def check_config_fits(config, family: ModelFamily, reader: ShardReader) -> None:
    """Before the skeleton is built (it creates a module per layer and allocates each parameter once before moving
    it to the meta device, so a config.json of 10**5 vision blocks took 5 minutes and 3 GiB), config.json's counts
    and sizes against the checkpoint's headers: num_hidden_layers is the number of decoder layers the checkpoint
    holds, the vision tower's depth at most its tensors, and every size (``config_sizes``) at most the largest
    dimension of any tensor. A ValueError names the field and both numbers."""
    where = reader.folder / "config.json"
    text = getattr(config, "text_config", config)
    held = _decoder_layers_held(reader, family)
    if getattr(text, "num_hidden_layers", held) != held:
        raise ValueError(f"{where}: num_hidden_layers is {text.num_hidden_layers}, but the checkpoint holds {held} "
                         "decoder layers")
    depth = getattr(getattr(config, "vision_config", None), "depth", None)
    prefixes = (family.to_disk(family.vision_tower + "."), family.vision_tower + ".")
    vision = sum(1 for key in reader.keys() if key.startswith(prefixes))
    if isinstance(depth, int) and depth > vision:
        raise ValueError(f"{where}: vision_config.depth is {depth}, more blocks than the {vision} tensors of the "
                         "checkpoint's vision tower could hold")
    largest = max((max(reader.meta(key)[1], default=1) for key in reader.keys()), default=0)
    for name, value in config_sizes(config):
        if value > largest:
            raise ValueError(f"{where}: {name} is {value}, larger than any dimension of the checkpoint's tensors "
                             f"(at most {largest}); config.json does not describe these weights")


def _decoder_layers_held(reader: ShardReader, family: ModelFamily) -> int:
    """How many decoder layers the checkpoint holds: the distinct N of its keys ``<decoder layers>.N.``."""
    prefixes = tuple({family.to_disk(family.decoder_layers + "."), family.decoder_layers + "."})
    held = set()
    for key in reader.keys():
        head = next((p for p in prefixes if key.startswith(p)), None)
        index = key[len(head):].split(".", 1)[0] if head else ""
        if index.isdigit():
            held.add(int(index))
    return len(held)


def check_checkpoint(model: torch.nn.Module, family: ModelFamily, reader: ShardReader) -> None:
    """Before any work, from the headers alone: the model has decoder layers; every parameter of the skeleton
    ``model`` is in the checkpoint with a floating dtype and the shape config.json gives it (vocab_size against the
    embedding and lm_head rows said as such). Each fault is a ValueError naming the folder and the tensor or
    field. (The checkpoint's own layer count was checked against config.json before, ``check_config_fits``.)"""
    if len(model.get_submodule(family.decoder_layers)) == 0:
        raise ValueError(f"{reader.folder}/config.json: the model has no decoder layers; nothing to quantize")
    for name, param in model.named_parameters():  # a tied lm_head is the embedding's parameter: not listed twice
        stored = find_stored(reader, family, name)
        if stored is None:
            raise ValueError(f"{reader.folder}: the checkpoint has no tensor {family.to_disk(name)!r} ({name}); "
                             "its files are incomplete or of another model")
        if not stored.dtype.is_floating_point:
            raise ValueError(f"{reader.folder}: {stored.key} is {NAMES[stored.dtype]} ({stored.dtype}) in the "
                             "checkpoint; weights must be floating point")
        if stored.shape != tuple(param.shape):
            raise ValueError(_shape_fault(reader.folder, str(stored), name, family, stored.shape, tuple(param.shape)))


def _shape_fault(folder: pathlib.Path, key: str, name: str, family: ModelFamily, shape: tuple,
                 expected: tuple) -> str:
    if name in (f"{family.embed_tokens}.weight", f"{family.lm_head}.weight") and shape[1:] == expected[1:]:
        return f"{folder}/config.json: vocab_size is {expected[0]}, but {key} has {shape[0]} rows; they must agree"
    return f"{folder}: {key} is {list(shape)} in the checkpoint, config.json makes it {list(expected)}"


def materialize(module: torch.nn.Module, prefix: str, reader: ShardReader, family: ModelFamily,
                device: torch.device, dtype: torch.dtype) -> None:
    """Fill ``module``'s meta parameters from ``reader``, in ``dtype`` on ``device``, one tensor at a time (Qwen VL
    models keep no persistent buffers; their rotary tables are computed). ``prefix``: the module's runtime path."""
    for name, sub in list(module.named_modules()):
        path = ".".join(p for p in (prefix, name) if p)
        materialize_shallow(sub, path, reader, family, device, dtype)


def release(module: torch.nn.Module) -> None:
    """Give ``module``'s parameters back: each becomes a meta tensor of the same shape."""
    for name, param in list(module.named_parameters(recurse=True)):
        owner, leaf = _owner(module, name)
        owner._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def materialize_upcast(module: torch.nn.Module, prefix: str, reader: ShardReader, family: ModelFamily,
                       device: torch.device, dtype: torch.dtype) -> list:
    """``materialize`` for a part that only runs forward (the vision tower during capture), holding its weights in
    the checkpoint's dtype and giving each leaf module ``dtype`` copies only while it runs: the values it computes
    with are the same as a ``dtype`` copy's (bf16 -> float32 is exact), in half the memory. The first leaf keeps
    ``dtype`` weights, so the part reports ``dtype`` (transformers casts pixel values to ``visual.dtype``).
    -> the hook handles, to remove at release."""
    stored = reader.meta(disk_key(reader, family, f"{prefix}.{next(iter(dict(module.named_parameters())))}"))[0]
    if stored == dtype or not stored.is_floating_point:
        materialize(module, prefix, reader, family, device, dtype)
        return []
    handles = []
    leaves = [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
    for j, (name, leaf) in enumerate(leaves):
        path = f"{prefix}.{name}" if name else prefix
        materialize_shallow(leaf, path, reader, family, device, dtype if j == 0 else stored)
        if j:
            handles += [leaf.register_forward_pre_hook(lambda m, args: _cast_parameters(m, dtype)),
                        leaf.register_forward_hook(lambda m, args, out: _cast_parameters(m, stored))]
    return handles


def materialize_shallow(module: torch.nn.Module, prefix: str, reader: ShardReader, family: ModelFamily,
                        device: torch.device, dtype: torch.dtype) -> None:
    """``materialize`` of a module's own parameters, not its children's."""
    for leaf, param in list(module._parameters.items()):
        if param is None:
            continue
        full = f"{prefix}.{leaf}" if prefix else leaf
        t = stored_tensor(reader, family, full).read(reader)
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{reader.folder}: {full} is {list(t.shape)} in the checkpoint, the config says "
                             f"{list(param.shape)}")
        module._parameters[leaf] = torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)


def _cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The module's own parameters, cast to ``dtype`` (new tensors; the old ones are freed)."""
    for leaf, p in module._parameters.items():
        if p is not None:
            module._parameters[leaf] = torch.nn.Parameter(p.to(dtype), requires_grad=False)


class RowsFromCheckpoint(torch.nn.Module):
    """Stands in for the token embedding during the capture pass: looks up only the rows of the tokens it is given,
    read from the checkpoint (a 7B's table is 1.09 GB in bf16; the calibration tokens need a few thousand rows),
    and returns them in ``dtype`` (the same values as a float32 table's)."""

    def __init__(self, reader: ShardReader, key: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.reader, self.key, self.dtype, self.device = reader, key, dtype, device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows, where = torch.unique(input_ids.cpu(), return_inverse=True)
        table = self.reader.get_rows(self.key, rows.tolist()).to(device=self.device, dtype=self.dtype)
        return table[where.to(self.device)]


class StreamedLayers:
    """A skeleton filled from the checkpoint part by part. ``prepare_capture`` loads what the capture pass needs
    (all but the decoder layers and lm_head; the token embedding reads only the rows the calibration tokens use,
    ``RowsFromCheckpoint``; the vision tower is held in the checkpoint's dtype, see ``materialize_upcast``);
    ``after_capture`` releases it; ``load(i)`` /
    ``release(i)`` hold one decoder layer at a time (padded when --pad-intermediate-to asks)."""

    def __init__(self, model, family: ModelFamily, reader: ShardReader, device: torch.device, dtype: torch.dtype,
                 pad_to: int | None = None):
        self.model, self.family, self.reader = model, family, reader
        self.device, self.dtype, self.pad_to = device, dtype, pad_to
        self.layers = model.get_submodule(family.decoder_layers)
        self._capture_parts: list[str] = []
        self._hooks: list = []

    def prepare_capture(self) -> None:
        skip = (self.family.decoder_layers, self.family.lm_head, self.family.embed_tokens)
        for name, child in _top_children(self.model, skip):
            if name == self.family.vision_tower:
                self._hooks += materialize_upcast(child, name, self.reader, self.family, self.device, self.dtype)
            else:
                materialize(child, name, self.reader, self.family, self.device, self.dtype)
            self._capture_parts.append(name)
        parent, leaf = self.family.embed_tokens.rsplit(".", 1)
        self._embedding = self.model.get_submodule(self.family.embed_tokens)
        key = disk_key(self.reader, self.family, self.family.embed_tokens + ".weight")
        setattr(self.model.get_submodule(parent), leaf, RowsFromCheckpoint(self.reader, key, self.dtype, self.device))

    def after_capture(self) -> None:
        for name in self._capture_parts:
            release(self.model.get_submodule(name))
        parent, leaf = self.family.embed_tokens.rsplit(".", 1)
        setattr(self.model.get_submodule(parent), leaf, self._embedding)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        trim_heap()

    def load(self, i: int) -> torch.nn.Module:
        layer = self.layers[i]
        materialize(layer, f"{self.family.decoder_layers}.{i}", self.reader, self.family, self.device, self.dtype)
        if self.pad_to:
            pad_layer(layer, self.family, self.pad_to)
        return layer

    def release(self, i: int) -> None:
        release(self.layers[i])
        trim_heap()


def _top_children(model: torch.nn.Module, skip: tuple[str, ...]):
    """(path, module) of the largest submodules that hold no ``skip`` path and lie inside none: the parts of the
    model besides the decoder layers, embedding and lm_head (vision tower, norms, ...)."""
    out = []

    def walk(module, path):
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if full in skip:
                continue
            if any(s.startswith(full + ".") for s in skip):
                walk(child, full)
            elif any(True for _ in child.parameters()):
                out.append((full, child))

    walk(model, "")
    return out


def load_base(model: str | pathlib.Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
              trust_remote_code: bool = False):
    """The whole model in memory (for Python users with small models, and the method benchmarks).
    -> (model, processor, family, storage dtype)."""
    folder = resolve_model_path(model)
    family = family_for(read_model_type(folder))
    check_remote_code(family, folder, trust_remote_code)
    config = load_config(folder, family)
    family = family.bind(config)
    storage = storage_dtype(config)  # before the skeleton is built: building it sets config.dtype to ``dtype``
    reader = ShardReader(folder)
    check_config_fits(config, family, reader)
    net = build_skeleton(config, family, dtype)
    check_checkpoint(net, family, reader)
    for name, child in _top_children(net, ()):
        tied = name == family.lm_head and family.lm_head + ".weight" not in reader
        if not tied:  # a tied lm_head is the embedding itself
            materialize(child, name, reader, family, torch.device(device), dtype)
    net.tie_weights()
    check_processor_files(folder, family)
    return net.eval(), load_processor(folder, family), family, storage
