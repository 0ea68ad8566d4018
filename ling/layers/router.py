"""Sigmoid router with an aux-loss-free expert bias and group-limited top-k (the reference's BailingMoeV2_5Gate)."""
import jax
import jax.numpy as jnp
from flax import nnx

from ling.config import LingConfig


class ExpertBias(nnx.Variable):
    """The per-expert selection bias: a buffer, updated outside the optimizer from expert load."""


def route(x_nd: jax.Array, w_de: jax.Array, bias_e: jax.Array, config: LingConfig):
    """Pick experts for N tokens.

    Returns topk_idx [N, k] int32 (in descending biased-score order), topk_weight [N, k] float32 and the fp32
    router logits [N, E]. The bias affects selection only; weights are the unbiased sigmoid scores renormalised
    over the chosen experts, times routed_scaling_factor.
    """
    c = config
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), w_de.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    biased = scores + bias_e.astype(jnp.float32)
    n, e = biased.shape
    grouped = biased.reshape(n, c.n_group, e // c.n_group)
    group_scores = jax.lax.top_k(grouped, min(2, e // c.n_group))[0].sum(-1)
    _, top_groups = jax.lax.top_k(group_scores, c.topk_group)
    group_mask = jnp.zeros((n, c.n_group), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
    expert_mask = jnp.repeat(group_mask, e // c.n_group, axis=1)
    _, topk_idx = jax.lax.top_k(jnp.where(expert_mask, biased, -jnp.inf), c.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, topk_idx, axis=1)
    if c.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return topk_idx.astype(jnp.int32), weights * c.routed_scaling_factor, logits
