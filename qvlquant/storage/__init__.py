"""Checkpoint I/O: safetensors shards, the sha256 manifest, atomic publishing of outputs."""
