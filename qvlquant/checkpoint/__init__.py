"""What is written for clients: the export, the model card, push, inspection and vLLM's rules."""
