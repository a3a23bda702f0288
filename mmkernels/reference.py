"""Pure-PyTorch reference (being written)."""
