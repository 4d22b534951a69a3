"""Quantization math as pure tensor functions (rtn, gptq, awq, formats), and the per-layer methods (apply) that the
layer loop dispatches to through ``apply.LAYER_METHODS`` (the names: ``spec.METHODS``)."""
