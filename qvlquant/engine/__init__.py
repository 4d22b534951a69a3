"""The streaming engine: capture, the layer loop, filling layers from the shards, resume, estimate."""
