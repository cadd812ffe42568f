"""Models: loading by path or Hub id, LoRA, the tiny-model factory, the shared forward pass."""
