"""MLA kernels: flash attention for training/prefill and paged latent decode, each with a jnp reference."""
from pallas_kernels.mla.attention import mla_attention
from pallas_kernels.mla.attention_reference import mla_attention_reference
from pallas_kernels.mla.decode import mla_decode
from pallas_kernels.mla.decode_reference import mla_decode_reference

__all__ = ["mla_attention", "mla_attention_reference", "mla_decode", "mla_decode_reference"]
