"""qvlquant: GPTQ / AWQ / RTN quantization of Qwen vision-language models."""

__version__ = "0.1.0"


def load(path="demo", **kwargs):
    """Load a BF16 or quantized checkpoint folder (or 'demo'). -> (model, processor). See qvlquant.runtime.load."""
    from qvlquant.runtime import load as _load

    return _load(path, **kwargs)


def quantize(**kwargs):
    """Quantize a model and export it. See qvlquant.api.quantize."""
    from qvlquant.api import quantize as _quantize

    return _quantize(**kwargs)
