"""Finding the model to quantize (the embedded demo, a local folder or a hub id), its classes, and building it
without holding it: a skeleton whose parameters live on the meta device, filled from the safetensors shards one
part at a time (the vision tower and embeddings for the capture pass, then one decoder layer at a time)."""

from __future__ import annotations

import contextlib
import json
import pathlib

import torch

from qvlquant.demo.paths import MODEL_DIR, TESTBED_DIR
from qvlquant.devices import return_freed_memory
from qvlquant.families import ModelFamily, family_for
from qvlquant.shards import ShardReader
from qvlquant.transforms import pad_layer

EMBEDDED = {"demo": MODEL_DIR, "testbed": TESTBED_DIR}  # models shipped inside the package
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.md"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def resolve_model_path(model: str | pathlib.Path) -> pathlib.Path:
    """'demo' -> the embedded demo; 'testbed' -> the embedded test bed (the demo with outlier channels,
    ``qvlquant.demo.testbed``); an existing folder -> itself; anything else is taken as a hub id and fetched
    (safetensors and text files only; the local cache when HF_HUB_OFFLINE=1)."""
    if str(model) in EMBEDDED:
        folder = EMBEDDED[str(model)]
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the embedded {model} model is missing from {folder}; reinstall qvlquant")
        return folder
    path = pathlib.Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
        return path
    if str(model).count("/") != 1 or str(model).startswith((".", "/")):
        raise FileNotFoundError(f"--model {model!r}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download  # only for hub ids

    try:
        return pathlib.Path(snapshot_download(str(model), allow_patterns=SAFE_PATTERNS))
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(f"--model {model!r}: could not fetch it from the hub ({type(e).__name__}); "
                                "offline? set HF_HUB_OFFLINE=1 with a cached copy, or pass a local folder") from None


def storage_dtype(config) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
    if isinstance(name, torch.dtype):
        return name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(str(name), torch.bfloat16)


def read_model_type(folder: pathlib.Path) -> str:
    """model_type from config.json, read as plain JSON (no remote code runs to find it)."""
    try:
        return json.loads((folder / "config.json").read_text())["model_type"]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{folder}/config.json has no readable model_type ({e})") from None


def check_remote_code(family: ModelFamily, folder: pathlib.Path, trust_remote_code: bool) -> None:
    if family.needs_remote_code and not trust_remote_code:
        raise ValueError(
            f"{folder} is a {family.name} model whose modelling code ships with the checkpoint and would run on "
            "this machine; pass --trust-remote-code only if you trust its source"
        )


def check_processor_files(folder: pathlib.Path, family: ModelFamily) -> None:
    """The processor (tokenizer and image processor) must be saved beside the weights: say which files are
    missing and where they come from, instead of transformers' OSError."""
    missing = []
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if not family.needs_remote_code and not any((folder / f).is_file() for f in IMAGE_PROCESSOR_FILES):
        missing.append(" or ".join(IMAGE_PROCESSOR_FILES))
    if missing:
        raise FileNotFoundError(
            f"{folder} has no processor files ({'; '.join(missing)}): copy them from the base model's hub repo "
            "(e.g. huggingface-cli download OWNER/NAME --include '*.json' '*.txt' '*.jinja') into the folder")


def model_class(config):
    from transformers import AutoModelForImageTextToText  # heavy: imported when a model is built

    return AutoModelForImageTextToText._model_mapping[type(config)]


def load_config(folder: pathlib.Path, family: ModelFamily):
    """The HF config of a full-precision checkpoint (an already quantized one is refused)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=family.needs_remote_code)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{folder} is already quantized; quantize its full-precision base model instead")
    return config


@contextlib.contextmanager
def meta_parameters():
    """Modules built inside this block get their parameters on the meta device (no memory, no initialisation);
    buffers (rotary frequencies) are computed for real, as ``from_pretrained`` computes them."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_skeleton(config, family: ModelFamily, dtype: torch.dtype):
    """The model with every parameter on the meta device, in ``dtype``, in eval mode."""
    with meta_parameters():
        if family.needs_remote_code:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
        else:
            model = model_class(config)._from_config(config, dtype=dtype)
    return model.eval()


def disk_key(reader: ShardReader, family: ModelFamily, runtime_name: str) -> str:
    """The checkpoint key of a runtime parameter name, in either layout (save_pretrained's or the runtime one)."""
    for key in (family.to_disk(runtime_name), runtime_name):
        if key in reader:
            return key
    raise KeyError(f"{reader.folder}: no tensor for {runtime_name} (looked for {family.to_disk(runtime_name)!r})")


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
        t = reader.get(disk_key(reader, family, full))
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
        return_freed_memory()

    def load(self, i: int) -> torch.nn.Module:
        layer = self.layers[i]
        materialize(layer, f"{self.family.decoder_layers}.{i}", self.reader, self.family, self.device, self.dtype)
        if self.pad_to:
            pad_layer(layer, self.family, self.pad_to)
        return layer

    def release(self, i: int) -> None:
        release(self.layers[i])
        return_freed_memory()


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
    from transformers import AutoProcessor, AutoTokenizer

    folder = resolve_model_path(model)
    family = family_for(read_model_type(folder))
    check_remote_code(family, folder, trust_remote_code)
    config = load_config(folder, family)
    reader = ShardReader(folder)
    net = build_skeleton(config, family, dtype)
    for name, child in _top_children(net, ()):
        tied = name == family.lm_head and family.lm_head + ".weight" not in reader
        if not tied:  # a tied lm_head is the embedding itself
            materialize(child, name, reader, family, torch.device(device), dtype)
    net.tie_weights()
    check_processor_files(folder, family)
    processor = (AutoTokenizer.from_pretrained(folder, trust_remote_code=True) if family.needs_remote_code
                 else AutoProcessor.from_pretrained(folder))
    return net.eval(), processor, family, storage_dtype(config)
