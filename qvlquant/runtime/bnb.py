"""bitsandbytes as the no-calibration baseline: a base model loaded through transformers' ``BitsAndBytesConfig``
(NF4 or LLM.int8), the one-line alternative users already know, scored beside qvlquant's calibrated exports.

``bnb-nf4:BASE`` / ``bnb-int8:BASE`` name such a model (``bnb-nf4`` alone: the demo). As in qvlquant's exports, the
vision tower and lm_head stay in full precision (both module-name layouts named: INTEROP.md). bitsandbytes
has a CPU backend (measured here with 0.50.2, the only version tried: both kinds load and run the demo on CPU).
"""

from __future__ import annotations

import torch

from qvlquant.engine.skeleton import resolve_model_path

BNB_KINDS = ("bnb-nf4", "bnb-int8")
# transformers' matcher anchors a name at the runtime module path (model.visual...) or matches a suffix
SKIP_MODULES = ["lm_head", "visual", "model.visual"]


def parse_bnb(spec) -> tuple[str, str] | None:
    """'bnb-nf4:BASE' -> ('bnb-nf4', BASE); 'bnb-int8' -> ('bnb-int8', 'demo'); anything else -> None."""
    kind, sep, base = str(spec).partition(":")
    if kind not in BNB_KINDS:
        return None
    if sep and not base:
        raise ValueError(f"--model {spec!r}: name the base after the colon (bnb-nf4:demo, bnb-int8:FOLDER)")
    return kind, base or "demo"


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401  optional: only the bnb-* baselines need it
    except ImportError:
        raise RuntimeError("bnb-nf4 / bnb-int8 need bitsandbytes: pip install 'qvlquant[bnb]' (bitsandbytes>=0.50; 0.50.2 runs "
                           "on this CPU too)") from None


def bnb_config(kind: str, compute_dtype: torch.dtype):
    from transformers import (
        BitsAndBytesConfig,  # heavy: only when a bnb model is loaded
    )

    if kind == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=SKIP_MODULES)
    if kind == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    raise ValueError(f"unknown bitsandbytes variant {kind!r}; choose one of {', '.join(BNB_KINDS)}")


def load_bnb(kind: str, base: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) of ``base`` ('demo', a folder or a hub id) quantized on load by bitsandbytes."""
    require_bitsandbytes()
    from transformers import (  # heavy: only when a model is loaded
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    folder = resolve_model_path(base)
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=bnb_config(kind, dtype),
                                                        device_map=device, dtype=dtype)
    return model.eval(), AutoProcessor.from_pretrained(folder)
