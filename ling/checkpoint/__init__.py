"""Checkpoint I/O in the published (Hugging Face safetensors) format."""
from ling.checkpoint.hf import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
