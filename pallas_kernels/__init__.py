"""Kernels the model calls: Lightning (simple-GLA) scan, MLA attention and latent decode, MoE grouped matmul.

Each op takes `impl` ("auto" | "tpu" | "gpu" | "reference") and `interpret`; "auto" picks the Pallas kernel for
the backend and the pure-jnp reference on CPU.
"""
from pallas_kernels.gmm import gmm, gmm_reference
from pallas_kernels.lightning import lightning_attention, lightning_attention_reference, lightning_decode_step
from pallas_kernels.mla import mla_attention, mla_attention_reference, mla_decode, mla_decode_reference

__all__ = [
    "gmm", "gmm_reference",
    "lightning_attention", "lightning_attention_reference", "lightning_decode_step",
    "mla_attention", "mla_attention_reference", "mla_decode", "mla_decode_reference",
]
