"""Running checkpoints: qvlquant.load with QuantLinear, and the bitsandbytes baselines."""
