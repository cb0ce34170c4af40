"""Compatibility with the official NVAE code: its checkpoint files."""

from nvae_fast.compat.official import load_official_checkpoint, read_official_checkpoint, save_official_checkpoint

__all__ = ["load_official_checkpoint", "read_official_checkpoint", "save_official_checkpoint"]
