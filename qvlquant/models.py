"""Finding and loading the full-precision model to quantize: the embedded demo, a local folder or a hub id."""

from __future__ import annotations

import pathlib

import torch

from qvlquant.demo.paths import MODEL_DIR
from qvlquant.families import ModelFamily, family_for

SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.md"]


def resolve_model_path(model: str | pathlib.Path) -> pathlib.Path:
    """'demo' -> the embedded demo; an existing folder -> itself; anything else is taken as a hub id and fetched
    (safetensors and text files only; the local cache when HF_HUB_OFFLINE=1)."""
    if str(model) == "demo":
        if not (MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(f"the embedded demo model is missing from {MODEL_DIR}; reinstall qvlquant")
        return MODEL_DIR
    path = pathlib.Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
        return path
    if str(model).count("/") != 1 or str(model).startswith((".", "/")):
        raise FileNotFoundError(f"--model {model!r}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(str(model), allow_patterns=SAFE_PATTERNS))
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(f"--model {model!r}: could not fetch it from the hub ({type(e).__name__})") from None


def storage_dtype(config) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
    if isinstance(name, torch.dtype):
        return name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(str(name), torch.bfloat16)


def read_model_type(folder: pathlib.Path) -> str:
    """model_type from config.json, read as plain JSON (no remote code runs to find it)."""
    import json

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


def load_base(model: str | pathlib.Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
              trust_remote_code: bool = False):
    """-> (model, processor, family, storage dtype). The model_type is checked before any weight loads; remote code
    runs only for families that need it and only when the user opted in."""
    from transformers import AutoConfig, AutoProcessor

    from qvlquant.runtime import model_class

    folder = resolve_model_path(model)
    family = family_for(read_model_type(folder))
    check_remote_code(family, folder, trust_remote_code)
    if family.needs_remote_code:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        return net, tokenizer, family, storage_dtype(net.config)
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{folder} is already quantized; quantize its full-precision base model instead")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} holds no .safetensors weights (pickle .bin checkpoints are refused)")
    processor = AutoProcessor.from_pretrained(folder)
    net = model_class(config).from_pretrained(folder, dtype=dtype).to(device).eval()
    return net, processor, family, storage_dtype(config)
