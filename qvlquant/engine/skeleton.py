"""Finding the model to quantize (an embedded model, a local folder or a hub id), checking it before any
weight loads (model type, remote code, processor files, already quantized), and building its skeleton: every
parameter on the meta device, no memory. ``qvlquant.engine.streaming`` fills it part by part."""

from __future__ import annotations

import contextlib
import json
import pathlib

import torch

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.engine.experts import unfuse_experts
from qvlquant.families import ModelFamily
from qvlquant.storage.files import read_text_bounded

EMBEDDED = EMBEDDED_MODELS  # models shipped inside the package
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.md"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# the model's JSON files transformers reads as objects: each checked to be one before transformers sees it
JSON_OBJECTS = ("config.json", "tokenizer_config.json", "tokenizer.json", "preprocessor_config.json",
                "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
                "special_tokens_map.json")
MAX_JSON_BYTES = 64 * 2**20  # a tokenizer.json is a few MB
# sizes in config.json that must be whole numbers >= 1 where present (0 builds an empty model or divides by zero)
TEXT_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "head_dim")
VISION_SIZES = ("depth", "hidden_size", "embed_dim", "intermediate_size", "out_hidden_size", "num_heads",
                "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels")
PROCESSOR_SIZES = ("patch_size", "merge_size", "temporal_patch_size")


def resolve_model_path(model: str | pathlib.Path) -> pathlib.Path:
    """'demo' -> the embedded demo; 'testbed' -> the embedded test bed (the demo with outlier channels,
    ``qvlquant.tools.demo.testbed``); 'demo-qwen3.5' / 'demo-qwen3.5-moe' -> the demo's sizes and data in Qwen3.5's
    architecture, dense or MoE (``qvlquant.tools.demo.train --family``); an existing folder -> itself; anything else is taken as a hub id and fetched
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


def read_json_object(path: pathlib.Path) -> dict:
    """A JSON file of the model that must hold an object (config.json, tokenizer_config.json, ...): bounded,
    UTF-8, an object; else a ValueError naming the file."""
    text = read_text_bounded(path, MAX_JSON_BYTES, "model file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object (got a {type(data).__name__})")
    return data


def read_model_type(folder: pathlib.Path) -> str:
    """model_type from config.json, read as plain JSON (no remote code runs to find it)."""
    model_type = read_json_object(folder / "config.json").get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{folder}/config.json: model_type must be a string, got {model_type!r:.80}")
    return model_type


@contextlib.contextmanager
def read_by_transformers(what: str):
    """What transformers raises while it reads ``what`` (a file of the model) as one ValueError naming it: the
    library raises many types for a malformed field (TypeError, AttributeError, its strict-dataclass errors, ...).
    A missing file stays an OSError; the library's own error is chained (``--debug`` shows it)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ValueError(f"{what}: transformers cannot read it ({reason[:300]})") from e


def config_sizes(config) -> list[tuple[str, object]]:
    """(field as config.json spells it, value) of each size TEXT_SIZES and VISION_SIZES name that the config has."""
    parts = [("", getattr(config, "text_config", config), TEXT_SIZES)]
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        parts.append(("vision_config.", vision, VISION_SIZES))
    return [(prefix + name, getattr(part, name)) for prefix, part, names in parts for name in names
            if getattr(part, name, None) is not None]


def check_sizes(config, folder: pathlib.Path) -> None:
    """The sizes config.json gives (``config_sizes``) are whole numbers >= 1."""
    for name, value in config_sizes(config):
        _whole_positive(value, f"{folder}/config.json: {name}")


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
    for name in JSON_OBJECTS:
        if (folder / name).exists():
            read_json_object(folder / name)


def load_processor(folder: pathlib.Path, family: ModelFamily):
    """The processor saved beside the weights: the tokenizer alone for Qwen-VL-Chat (its images go through its
    remote code; the caller checked --trust-remote-code first), else the tokenizer and image processor."""
    from transformers import (  # heavy; the model type was checked first
        AutoProcessor,
        AutoTokenizer,
    )

    with read_by_transformers(f"the processor files of {folder}"):
        if family.needs_remote_code:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder)
    for part in ("image_processor", "video_processor"):
        for name in PROCESSOR_SIZES:
            value = getattr(getattr(processor, part, None), name, None)
            _whole_positive(value, f"{folder}: the {part.replace('_', ' ')}'s {name}")
    return processor


def _whole_positive(value, what: str) -> None:
    """``value`` (None: absent) must be a whole number >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be a whole number of at least 1, got {value!r:.80}")


def model_class(config):
    from transformers import (
        AutoModelForImageTextToText,  # heavy: imported when a model is built
    )

    return AutoModelForImageTextToText._model_mapping[type(config)]


def load_config(folder: pathlib.Path, family: ModelFamily):
    """The HF config of a full-precision checkpoint (an already quantized one is refused)."""
    from transformers import AutoConfig

    with read_by_transformers(f"{folder}/config.json"):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=family.needs_remote_code)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{folder} is already quantized; quantize its full-precision base model instead")
    architectures = getattr(config, "architectures", None)
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"{folder}/config.json: architectures must be a list of class names, got "
                         f"{architectures!r:.80}; the export copies it")
    check_sizes(config, folder)
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
    """The model with every parameter on the meta device, in ``dtype``, in eval mode, its fused experts (if any) as
    one linear per expert (``qvlquant.engine.experts``). A config.json transformers cannot build a model from is a
    ValueError naming it."""
    with meta_parameters(), read_by_transformers(f"{config.name_or_path or 'the model'}/config.json"):
        if family.needs_remote_code:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
        else:
            model = model_class(config)._from_config(config, dtype=dtype)
    unfuse_experts(model, family)  # MoE: one linear per expert, as the checkpoint stores them
    return model.eval()
