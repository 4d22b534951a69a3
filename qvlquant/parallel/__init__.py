"""Several processes: torch.distributed collectives, the process launcher, device and thread choice."""
