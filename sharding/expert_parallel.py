"""Dropless expert-parallel MoE: a shard_map island in which tokens travel to the devices that hold their experts.

Tokens are split over the batch axes (which include the expert axis) and the length axis; the routed experts'
[E, D, F] weights over `exp` (E) and `mlp` (F, tensor parallelism), gathered over their `embed` axis (FSDP) on
entry. Each device routes its own tokens, then one of two exact dispatches runs over the expert axis:

* ragged (TPU/GPU): assignments sorted by expert are sent with lax.ragged_all_to_all to the shard owning the
  expert, regrouped by local expert for the grouped matmul, and sent back the same way. The receive buffer holds
  the worst case (every peer's tokens all choosing this shard), so nothing is ever dropped; tokens go in chunks
  small enough that this worst case is no bigger than the rows a shard sends (`dispatch_chunks`).
* gather (CPU, where XLA has no ragged-all-to-all): tokens are all-gathered over the expert axis, each shard runs
  its local experts on the assignments that chose them, and a reduce-scatter returns each token's sum to its owner.

With F split over `tensor` each tensor shard computes a partial down-projection; one psum over `tensor` on the
combined [tokens, D] output completes it. Per-expert load is counted before dispatch and psum'd over the token axes.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from sharding.mesh import active_mesh, axis_size
from sharding.rules import constrain, logical_to_spec, mesh_axes


def dispatch_kind() -> str:
    """The dispatch for this backend: ragged where XLA implements ragged-all-to-all (TPU, GPU), else gather."""
    return "ragged" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "gather"


def combine_rows(y_md, w_m, token_of_row_m, n: int):
    """Sum each token's weighted expert outputs: rows [M, D] with row weights [M] -> [n, D] in the rows' dtype.
    The weighting and the sum run in float32, as in the reference, so bf16 outputs are rounded once, not per add."""
    weighted = y_md.astype(jnp.float32) * w_m.astype(jnp.float32)[:, None]
    return jnp.zeros((n, y_md.shape[1]), jnp.float32).at[token_of_row_m].add(weighted).astype(y_md.dtype)


def _gathered(x_nd, topk_nk, w_nk, weights, *, sort, ffn, axis: str):
    """All-gather tokens over `axis`, run this shard's experts, reduce-scatter the sums back."""
    n, k = topk_nk.shape
    e_local = weights[0].shape[0]
    x_all, topk_all, w_all = (lax.all_gather(a, axis, axis=0, tiled=True) for a in (x_nd, topk_nk, w_nk))
    local_nk = topk_all - lax.axis_index(axis) * e_local
    mine_nk = (local_nk >= 0) & (local_nk < e_local)
    # Other shards' assignments sort last as expert e_local; rows past the local groups are zeros in gmm.
    token_of_row, order, group_sizes = sort(jnp.where(mine_nk, local_nk, e_local), e_local + 1)
    y_rows = ffn(x_all[token_of_row], group_sizes[:e_local], *weights)
    w_rows = jnp.where(mine_nk, w_all, 0.0).reshape(-1)[order]
    y_all = combine_rows(y_rows, w_rows, token_of_row, x_all.shape[0])
    return lax.psum_scatter(y_all, axis, scatter_dimension=0, tiled=True)


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def dispatch_chunks(n: int, k: int, e_local: int, shards: int) -> int:
    """How many token chunks the ragged dispatch sends one after another: enough that a chunk's worst-case receive
    buffer (every peer's chunk choosing only this shard's experts, n/c · min(k, e_local) · shards rows) is no
    larger than the n · k rows this shard sends, and a divisor of n."""
    target = max(1, shards * min(k, e_local) // k)
    return max(c for c in range(1, min(target, n) + 1) if n % c == 0)


def _ragged(x_nd, topk_nk, w_nk, weights, *, sort, ffn, axis: str, num_experts: int):
    """Dispatch in token chunks (each rematerialised in the backward pass, so one chunk's buffers are live)."""
    n, k = topk_nk.shape
    shards = lax.axis_size(axis)
    chunks = dispatch_chunks(n, k, num_experts // shards, shards)
    one = functools.partial(_ragged_chunk, weights=weights, sort=sort, ffn=ffn, axis=axis, num_experts=num_experts)
    if chunks == 1:
        return one(x_nd, topk_nk, w_nk)
    split = lambda a: a.reshape(chunks, n // chunks, *a.shape[1:])
    y_cnd = lax.map(jax.checkpoint(lambda xs: one(*xs)), (split(x_nd), split(topk_nk), split(w_nk)))
    return y_cnd.reshape(n, -1)


def _ragged_chunk(x_nd, topk_nk, w_nk, *, weights, sort, ffn, axis: str, num_experts: int):
    """Send each assignment to its expert's shard with ragged_all_to_all, run the local experts, send back."""
    n, k = topk_nk.shape
    shards = lax.axis_size(axis)
    e_local = num_experts // shards
    token_of_row, order, counts_e = sort(topk_nk, num_experts)
    x_sorted = x_nd[token_of_row]
    send_sizes = counts_e.reshape(shards, e_local).sum(1)
    input_offsets = _exclusive_cumsum(send_sizes)
    recv_counts = lax.all_to_all(counts_e.reshape(shards, e_local), axis, 0, 0, tiled=True)  # [source, local expert]
    recv_sizes = recv_counts.sum(1)
    recv_offsets = _exclusive_cumsum(recv_sizes)
    output_offsets = lax.all_to_all(recv_offsets, axis, 0, 0, tiled=True)  # where my rows land on each peer
    capacity = n * min(k, e_local) * shards  # every peer's tokens choosing only this shard's experts
    buffer = ragged_all_to_all(x_sorted, jnp.zeros((capacity, x_nd.shape[1]), x_nd.dtype), input_offsets,
                               send_sizes, output_offsets, recv_sizes, axis_name=axis)
    # The buffer holds (source, local expert) blocks in that order; regroup its rows by local expert.
    block_ends = jnp.cumsum(recv_counts.reshape(-1))
    block_of_row = jnp.searchsorted(block_ends, jnp.arange(capacity), side="right")
    expert_of_row = jnp.where(block_of_row < shards * e_local, block_of_row % e_local, e_local)
    perm = jnp.argsort(expert_of_row, stable=True)
    y_grouped = ffn(buffer[perm], recv_counts.sum(0), *weights)
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(capacity, dtype=perm.dtype))
    return_offsets = lax.all_to_all(input_offsets, axis, 0, 0, tiled=True)
    y_sorted = ragged_all_to_all(y_grouped[inverse], jnp.zeros((n * k, x_nd.shape[1]), y_grouped.dtype),
                                 recv_offsets, recv_sizes, return_offsets, send_sizes, axis_name=axis)
    return combine_rows(y_sorted, w_nk.reshape(-1)[order], token_of_row, n)


ragged_all_to_all = lax.ragged_all_to_all  # module attribute so tests can emulate it on CPU


def _local(x_btd, valid_bt, gate_de, bias_e, w_gate, w_up, w_down, *, route, sort, ffn, dtype, expert_axis,
           tensor_axis, token_axes, dispatch):
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    topk_nk, w_nk, logits_ne = route(x_nd, gate_de, bias_e)
    num_experts = logits_ne.shape[-1]
    valid_n = valid_bt.reshape(-1)
    load_e = jnp.zeros((num_experts,), jnp.int32).at[topk_nk].add(valid_n[:, None].astype(jnp.int32))
    if token_axes:
        load_e = lax.psum(load_e, token_axes)
    x_nd, weights = x_nd.astype(dtype), (w_gate, w_up, w_down)
    if expert_axis is None:
        token_of_row, order, group_sizes = sort(topk_nk, num_experts)
        y_rows = ffn(x_nd[token_of_row], group_sizes, *weights)
        y_nd = combine_rows(y_rows, w_nk.reshape(-1)[order], token_of_row, b * t)
    elif dispatch == "ragged":
        y_nd = _ragged(x_nd, topk_nk, w_nk, weights, sort=sort, ffn=ffn, axis=expert_axis,
                       num_experts=num_experts)
    else:
        y_nd = _gathered(x_nd, topk_nk, w_nk, weights, sort=sort, ffn=ffn, axis=expert_axis)
    if tensor_axis is not None:
        y_nd = lax.psum(y_nd, tensor_axis)
    return y_nd.reshape(b, t, d), topk_nk.reshape(b, t, -1), logits_ne.reshape(b, t, -1), load_e


def routed_experts(x_btd, gate_de, bias_e, w_gate, w_up, w_down, *, route, sort, ffn, dtype):
    """The routed half of the MoE under the active mesh (requires one: see `active_mesh`).

    x [B, T, D]; gate [D, E]; bias [E]; w_gate, w_up [E, D, F], w_down [E, F, D] in the compute `dtype`.
    route(x_nd, gate, bias) -> (topk [N, k], weights [N, k], logits [N, E]); sort(topk, E) -> (token of each
    sorted row, order, group sizes); ffn(rows, group_sizes, w_gate, w_up, w_down) -> rows: the model's own
    functions, applied per shard. Returns y [B, T, D] (weighted sum of each token's experts), topk [B, T, k],
    router logits [B, T, E] and the load [E] (tokens per expert over the whole batch).
    """
    mesh = active_mesh()
    b = x_btd.shape[0]
    pad = -b % axis_size(mesh, mesh_axes("batch", mesh))
    valid_bt = jnp.ones(x_btd.shape[:2], bool)
    if pad:  # decode batches smaller than the batch axes: pad rows, masked out of the load, dropped after.
        # The rows are gathered over the batch axes first: padding rows split over fewer batch shards than the
        # island uses and letting XLA move them gave row 1 another row's tokens on data2·fsdp2·tensor2 (jax 0.10.2,
        # XLA:CPU). Only batches smaller than the batch shards take this path; the sequence stays split.
        x_btd = constrain(x_btd, (None, "length", None))
        x_btd = jnp.pad(x_btd, ((0, pad), (0, 0), (0, 0)))
        valid_bt = jnp.pad(valid_bt, ((0, pad), (0, 0)))
    tok_spec = logical_to_spec(("batch", "length", None), x_btd.shape, mesh)
    token_axes = tuple(a for entry in tok_spec for a in ((entry,) if isinstance(entry, str) else entry or ()))
    up_spec = logical_to_spec(("exp", None, "mlp"), w_gate.shape, mesh)
    down_spec = P(up_spec[0], up_spec[2], None)
    expert_axis, tensor_axis = up_spec[0], up_spec[2]
    if expert_axis is not None and (not isinstance(expert_axis, str) or expert_axis not in token_axes):
        raise ValueError(f"experts split over {expert_axis!r} need tokens split over it too; tokens use {tok_spec}")
    if isinstance(tensor_axis, tuple) or (tensor_axis is not None and tensor_axis in token_axes):
        raise ValueError(f"expert hidden dim split over {tensor_axis!r} needs tokens replicated over one such axis")
    body = functools.partial(_local, route=route, sort=sort, ffn=ffn, dtype=dtype, expert_axis=expert_axis,
                             tensor_axis=tensor_axis, token_axes=token_axes, dispatch=dispatch_kind())
    out = jax.shard_map(body, in_specs=(tok_spec, P(*tok_spec[:2]), P(), P(), up_spec, up_spec, down_spec),
                        out_specs=(tok_spec, tok_spec, tok_spec, P()), check_vma=False)(
        x_btd, valid_bt, gate_de, bias_e, w_gate, w_up, w_down)
    y, topk, logits, load = out
    # Pinned to the residual stream's layout: left to propagation, adding the shared expert's output (a partial sum
    # over tensor) to these rows gave wrong rows inside the layer scan on data2·fsdp2·tensor2 (jax 0.10.2, XLA:CPU).
    return constrain(y[:b], ("batch", "length", "act_embed")), topk[:b], logits[:b], load

