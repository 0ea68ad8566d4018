"""Rotary embeddings as the reference computes them: default and YaRN tables, NeoX partial rotation for the
Lightning layers and the interleaved (GPT-J pair) rotation for MLA.

Both attention kinds share one table of `rotary_dim = head_dim * partial_rotary_factor` dims; YaRN's attention
factor multiplies cos and sin, so it scales the rotated dims of q and k in both kinds.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from ling.config import LingConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: LingConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim // 2] (float32) and the attention scaling that multiplies cos and sin."""
    dim, base = config.rotary_dim, config.rope_theta
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extrapolation = (1.0 / pos_freqs).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_extrapolation, 1.0
    factor = rs.factor
    if rs.attention_factor is not None:
        attention_scaling = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_scaling = _yarn_mscale(factor, rs.mscale) / _yarn_mscale(factor, rs.mscale_all_dim)
    else:
        attention_scaling = _yarn_mscale(factor)
    original_max = rs.original_max_position_embeddings or config.max_position_embeddings
    beta_fast, beta_slow = rs.beta_fast or 32, rs.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.truncate is None or rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    inv_interpolation = (1.0 / (factor * pos_freqs)).astype(np.float32)
    inv_freq = inv_interpolation * ramp + inv_extrapolation * (1 - ramp)
    return inv_freq.astype(np.float32), float(attention_scaling)


def mla_softmax_scale(config: LingConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)² under YaRN with a non-zero mscale_all_dim."""
    scale = config.qk_head_dim ** -0.5
    rs = config.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        scale *= _yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


def rope_table(config: LingConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] in float32 for integer positions [B, T]."""
    inv_freq, scaling = rope_frequencies(config)
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def _rotate_neox(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def apply_rope_partial(x_bthd: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """NeoX (half-rotated) RoPE on the first R dims of each head; the rest pass through. Math in x's dtype
    after casting the table, as the reference does."""
    r = cos_btr.shape[-1]
    cos, sin = cos_btr[:, :, None].astype(x_bthd.dtype), sin_btr[:, :, None].astype(x_bthd.dtype)
    return jnp.concatenate([_rotate_neox(x_bthd[..., :r], cos, sin), x_bthd[..., r:]], axis=-1)


def apply_rope_interleaved(x_bthr: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """MLA's rotation: de-interleave ([x0,x2,..,x1,x3,..]) then NeoX-rotate. The output stays de-interleaved
    (q and k alike, so scores are unchanged). x has exactly R = rotary_dim last dims."""
    *lead, r = x_bthr.shape
    x = x_bthr.reshape(*lead, r // 2, 2).swapaxes(-1, -2).reshape(*lead, r)
    return _rotate_neox(x, cos_btr[:, :, None].astype(x.dtype), sin_btr[:, :, None].astype(x.dtype))
