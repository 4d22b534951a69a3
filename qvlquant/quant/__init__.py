"""Quantization math (pure tensor functions) and the per-layer methods the pipeline dispatches to."""

from qvlquant.quant.apply import awq_layer, gptq_layer, rtn_layer

METHODS = {
    "rtn": rtn_layer,
    "gptq": gptq_layer,
    "awq": awq_layer,
}
