"""Lightning (simple gated linear attention) kernels: TPU (Mosaic) and GPU (Triton) Pallas, plus the jnp twin."""
from pallas_kernels.lightning.ops import lightning_attention
from pallas_kernels.lightning.reference import lightning_attention_reference, lightning_decode_step

__all__ = ["lightning_attention", "lightning_attention_reference", "lightning_decode_step"]
