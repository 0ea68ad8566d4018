"""Lightning attention (simple gated linear attention with a constant per-head decay) in plain jnp.

Recurrence per (batch, head), with g = log_decay[h] <= 0:

    S_t = exp(g) * S_{t-1} + k_t^T v_t          (S_{t-1} := 0 where a new packed segment starts at t)
    o_t = scale * q_t S_t

The chunked form below is the model's CPU path and the numerical twin of the Pallas kernels. Within a chunk of C
positions, with G_i the inclusive cumulative log-decay and r_i the run id (number of segment starts so far):

    o_i  = scale * (sum_{j <= i, r_j == r_i} exp(G_i - G_j) (q_i . k_j) v_j + exp(G_i) [r_i == r_prev] q_i S_prev)
    S    = exp(G_C) [r_C == r_prev] S_prev + sum_{j: r_j == r_C} exp(G_C - G_j) k_j^T v_j

Every exponent is g times an integer step count i - j >= 0 (masked before exp), so a strongly negative decay
underflows to zero instead of overflowing, and no precision is lost to differences of large cumulative sums.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
    """Raises ValueError naming the argument whose shape does not fit q [B, T, H, K]."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {q.shape}, k {k.shape}")
    b, t, h, _ = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B, T, H, V] = [{b}, {t}, {h}, V]; got {v.shape}")
    if log_decay.shape != (h,):
        raise ValueError(f"log_decay must be [H] = [{h}]; got {log_decay.shape}")
    state_shape = (b, h, q.shape[3], v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [B, H, K, V] = {list(state_shape)}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = [{b}, {t}]; got {segment_ids.shape}")


def chunk_relative_runs(segment_ids, batch: int, length: int, chunk_size: int):
    """[B, T] int32: segment starts since the position just before each chunk (its carried state's position).

    0 means "still connected to the carried state"; equal values inside a chunk mean "no restart in between".
    Chunk 0 is measured from position 0, so initial_state belongs to the segment at t = 0.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    runs_bt = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(starts, axis=1)], axis=1)
    carried_from = jnp.maximum(jnp.arange(length) // chunk_size * chunk_size - 1, 0)
    return runs_bt - runs_bt[:, carried_from]


def decay_steps(pos, start, length: int):
    """Decay steps from chunk `start` up to and including `pos`; positions past `length` (padding) add none."""
    return jnp.minimum(pos, length - 1) - start + 1


def masked_decay(g, steps_to, steps_from, connected):
    """exp(g * (steps_to - steps_from)) where connected, else 0. The step difference is an exact integer (a
    difference of two large float log-decays would lose ~1e-5), and a masked exponent is never evaluated."""
    return jnp.exp(jnp.where(connected, g * (steps_to - steps_from).astype(jnp.float32), -jnp.inf))


class ChunkDecays(NamedTuple):
    """Decay factors of one chunk (shared by the reference and the kernels), broadcastable against C-row tiles."""
    intra: jax.Array    # [.., C, C] exp(G_i - G_j) if j <= i in the same run, else 0; [j, i] order if transposed
    into: jax.Array     # [.., C, 1] exp(G_i) if position i still sees the carried state, else 0
    out: jax.Array      # [.., C, 1] exp(G_last - G_j) if position j reaches the chunk's final state, else 0
    through: jax.Array  # [.., 1, 1] exp(G_last) if the carried state survives the whole chunk, else 0


def chunk_decays(g, rel_col, rel_row, rel_last, start, chunk_size: int, length: int, *, transposed=False):
    """Decay factors of the chunk starting at `start`. g: per-head log-decay; rel_col [.., C, 1] and rel_row
    [.., 1, C]: chunk_relative_runs of the chunk; rel_last [.., 1, 1]: that of its last position."""
    pos_col = start + lax.broadcasted_iota(jnp.int32, (chunk_size, 1), 0)
    pos_row = start + lax.broadcasted_iota(jnp.int32, (1, chunk_size), 1)
    n_col = decay_steps(pos_col, start, length)
    n_row = decay_steps(pos_row, start, length)
    n_last = decay_steps(start + chunk_size - 1, start, length)
    same = rel_col == rel_row
    if transposed:
        intra = masked_decay(g, n_row, n_col, (pos_row >= pos_col) & same)
    else:
        intra = masked_decay(g, n_col, n_row, (pos_col >= pos_row) & same)
    return ChunkDecays(intra, into=masked_decay(g, n_col, 0, rel_col == 0),
                       out=masked_decay(g, n_last, n_col, rel_col == rel_last),
                       through=masked_decay(g, n_last, 0, rel_last == 0))


def tile_dot(a, b, dtype, *, trans_a=False, trans_b=False):
    """a @ b on 2-D kernel tiles, either side optionally transposed, operands cast to `dtype` and float32 accumulation:
    one bf16 MXU/MMA pass for bf16 inputs, exact float32 passes for float32 inputs. `a` is transposed as float32
    before the cast (the 32-bit transpose is the one every Mosaic generation lowers)."""
    if trans_a:
        a = a.T
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = _HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                           preferred_element_type=jnp.float32)


def lightning_attention_reference(q, k, v, log_decay, *, scale=None, initial_state=None, segment_ids=None,
                                  chunk_size: int = 64):
    """Chunked jnp lightning attention: a lax.scan over chunks carrying the [B, H, K, V] state.

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] (<= 0, per step).
      scale: multiplies q (default K**-0.5). initial_state: [B, H, K, V] or None (zeros).
      segment_ids: [B, T] int or None; the state restarts where the id changes.
    Returns:
      o [B, T, H, V] in v's dtype and the final state [B, H, K, V] float32.
    """
    check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size)
    b, t, h, dk = q.shape
    dv = v.shape[3]
    scale = dk ** -0.5 if scale is None else scale
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t

    def chunked(x):  # [B, T, H, D] -> [N, B, H, C, D] float32, zero padded
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n, c, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    rel_nbc = jnp.pad(chunk_relative_runs(segment_ids, b, t, c), ((0, 0), (0, pad)), mode="edge")
    rel_nbc = rel_nbc.reshape(b, n, c).transpose(1, 0, 2)
    g_1h11 = log_decay.astype(jnp.float32)[None, :, None, None]
    state0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))

    def step(state_bhkv, xs):
        q_bhck, k_bhck, v_bhcv, rel_bc, start = xs
        rel_b1c1 = rel_bc[:, None, :, None]
        d = chunk_decays(g_1h11, rel_b1c1, rel_b1c1.swapaxes(-1, -2), rel_b1c1[..., -1:, :], start, c, t)
        scores = jnp.einsum("bhik,bhjk->bhij", q_bhck * scale, k_bhck, precision=_HIGHEST) * d.intra
        o_bhcv = jnp.einsum("bhij,bhjv->bhiv", scores, v_bhcv, precision=_HIGHEST)
        o_bhcv += jnp.einsum("bhik,bhkv->bhiv", q_bhck * (scale * d.into), state_bhkv, precision=_HIGHEST)
        state_bhkv = d.through * state_bhkv + jnp.einsum("bhjk,bhjv->bhkv", k_bhck * d.out, v_bhcv,
                                                          precision=_HIGHEST)
        return state_bhkv, o_bhcv

    final_bhkv, o_nbhcv = lax.scan(step, state0, (chunked(q), chunked(k), chunked(v), rel_nbc, jnp.arange(n) * c))
    o_bthv = o_nbhcv.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, dv)[:, :t]
    return o_bthv.astype(v.dtype), final_bhkv


def lightning_decode_step(q, k, v, log_decay, state, *, scale=None):
    """One generated token: q, k [B, H, K]; v [B, H, V]; state [B, H, K, V] -> (o [B, H, V] in v's dtype, new state
    [B, H, K, V] float32). The token itself is included in its own output, as in the prefill."""
    b, h, dk = q.shape
    if k.shape != q.shape or v.shape[:2] != (b, h) or state.shape != (b, h, dk, v.shape[2]):
        raise ValueError(f"expected q, k [B, H, K], v [B, H, V], state [B, H, K, V]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}, state {state.shape}")
    if log_decay.shape != (h,):
        raise ValueError(f"log_decay must be [H] = [{h}]; got {log_decay.shape}")
    scale = dk ** -0.5 if scale is None else scale
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    decay_h = jnp.exp(log_decay.astype(jnp.float32))
    new_bhkv = decay_h[None, :, None, None] * state.astype(jnp.float32) + k32[..., :, None] * v32[..., None, :]
    o_bhv = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32) * scale, new_bhkv, precision=_HIGHEST)
    return o_bhv.astype(v.dtype), new_bhkv
