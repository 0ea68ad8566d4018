"""Routed experts + shared expert (the reference's BailingMoeV2_5SparseMoeBlock), dropless.

Token-expert assignments are sorted by expert and the experts run as grouped matmuls (`gmm`) over the sorted rows,
so no [tokens, experts, hidden] tensor is ever formed and no token is dropped.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling.config import LingConfig
from ling.layers.dispatch import kernel_impl
from ling.layers.mlp import SwiGLU
from ling.layers.params import param
from ling.layers.router import ExpertBias, route
from pallas_kernels import gmm
from sharding import expert_parallel
from sharding.mesh import active_mesh


def expert_ffn(x_md, group_sizes, w_gate, w_up, w_down, *, impl: str, interpret: bool):
    """SwiGLU experts on rows sorted by expert: x [M, D], group_sizes [E] -> [M, D]."""
    g = gmm(x_md, w_gate, group_sizes, impl=impl, interpret=interpret)
    u = gmm(x_md, w_up, group_sizes, impl=impl, interpret=interpret)
    return gmm(jax.nn.silu(g) * u, w_down, group_sizes, impl=impl, interpret=interpret)


def sort_by_expert(topk_idx_nk: jax.Array, num_experts: int):
    """Order of the N·k assignments grouped by expert: (token index per sorted row [N·k], order [N·k],
    group_sizes [E])."""
    flat = topk_idx_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of_row = order // topk_idx_nk.shape[1]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return token_of_row, order, group_sizes


class MoE(nnx.Module):
    def __init__(self, config: LingConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.dtype = dtype
        e, f, n, std = c.hidden_size, c.moe_intermediate_size, c.num_experts, c.initializer_range
        self.gate = param(rngs, (e, n), ("embed", None), dtype=param_dtype, std=std)
        self.expert_bias = ExpertBias(jnp.zeros((n,), jnp.float32), logical_axes=(None,))
        self.gate_proj = param(rngs, (n, e, f), ("exp", "embed", "mlp"), dtype=param_dtype, std=std)
        self.up_proj = param(rngs, (n, e, f), ("exp", "embed", "mlp"), dtype=param_dtype, std=std)
        self.down_proj = param(rngs, (n, f, e), ("exp", "mlp", "embed"), dtype=param_dtype, std=std)
        self.shared_experts = (SwiGLU(e, f * c.num_shared_experts, init_std=std, param_dtype=param_dtype,
                                      dtype=dtype, rngs=rngs) if c.num_shared_experts else None)

    def __call__(self, x_btd: jax.Array):
        """x [B, T, hidden] -> (y [B, T, hidden], aux) with aux["load"] [E] (tokens routed to each expert),
        aux["topk_idx"] [B, T, k] and aux["router_logits"] [B, T, E]."""
        c, dt = self.config, self.dtype
        b, t, d = x_btd.shape
        impl, interpret = kernel_impl(c)
        experts = (self.gate_proj[...].astype(dt), self.up_proj[...].astype(dt), self.down_proj[...].astype(dt))
        if active_mesh() is not None:  # shard_map island: expert-parallel dispatch, tensor-parallel experts
            # Tokens stay [B, T, D] outside the island: merging batch and length dims that are split over mesh axes
            # gave wrong results inside the layer scan on data2·tensor2·context2 (XLA:CPU, jax 0.10.2; both
            # partitioners), while the island flattens its local block safely.
            y_btd, topk_idx, logits, group_sizes = expert_parallel.routed_experts(
                x_btd, self.gate[...], self.expert_bias[...], *experts, dtype=dt,
                route=functools.partial(route, config=c), sort=sort_by_expert,
                ffn=functools.partial(expert_ffn, impl=impl, interpret=interpret))
        else:
            x = x_btd.reshape(b * t, d)
            topk_idx, weights, logits = route(x, self.gate[...], self.expert_bias[...], c)
            token_of_row, order, group_sizes = sort_by_expert(topk_idx, c.num_experts)
            y_rows = expert_ffn(x[token_of_row].astype(dt), group_sizes, *experts, impl=impl, interpret=interpret)
            y_btd = expert_parallel.combine_rows(y_rows, weights.reshape(-1)[order], token_of_row, b * t).reshape(
                b, t, d)
        if self.shared_experts is not None:
            y_btd = y_btd + self.shared_experts(x_btd)
        aux = {"load": group_sizes, "topk_idx": topk_idx.reshape(b, t, -1), "router_logits": logits.reshape(b, t, -1)}
        return y_btd, aux
