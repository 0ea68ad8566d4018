"""Public lightning attention: dispatch to the TPU / GPU Pallas kernels (behind jax.custom_vjp) or the jnp reference."""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import gpu, tpu
from pallas_kernels.lightning.reference import check_inputs, chunk_relative_runs, lightning_attention_reference

_KERNELS = {
    "tpu": (tpu.lightning_fwd_tpu, tpu.lightning_bwd_tpu),
    "gpu": (gpu.lightning_fwd_gpu, gpu.lightning_bwd_gpu),
}
_AUTO = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _kernel_attention(q, k, v, log_decay, state0, rel, scale, chunk_size, impl, interpret):
    fwd, _ = _KERNELS[impl]
    return fwd(q, k, v, log_decay, rel, state0, scale=scale, chunk_size=chunk_size, interpret=interpret)


def _kernel_attention_fwd(q, k, v, log_decay, state0, rel, scale, chunk_size, impl, interpret):
    out = _kernel_attention(q, k, v, log_decay, state0, rel, scale, chunk_size, impl, interpret)
    return out, (q, k, v, log_decay, state0, rel)


def _kernel_attention_bwd(scale, chunk_size, impl, interpret, residuals, cotangents):
    q, k, v, log_decay, state0, rel = residuals
    do, dfinal = cotangents
    _, bwd = _KERNELS[impl]
    dq, dk, dv, dstate0 = bwd(q, k, v, log_decay, rel, state0, do, dfinal, scale=scale, chunk_size=chunk_size,
                              interpret=interpret)
    # log_decay is a fixed per-head constant of the architecture: it gets no gradient.
    return dq, dk, dv, jnp.zeros_like(log_decay), dstate0, None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def lightning_attention(q, k, v, log_decay, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
                        impl="auto", interpret=False):
    """Lightning attention: S_t = exp(log_decay) S_{t-1} + k_t^T v_t (zeroed at segment starts), o_t = scale q_t S_t.

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] (<= 0, per step, no gradient through the kernels).
      scale: multiplies q (default K**-0.5). initial_state: [B, H, K, V] or None (zeros).
      segment_ids: [B, T] int or None; the state restarts from zero where the id changes along T.
      chunk_size: positions per chunk (intra-chunk masked matmuls, inter-chunk carried state).
      impl: "auto" (TPU kernel on TPU, GPU kernel on GPU, reference elsewhere), "tpu", "gpu" or "reference".
      interpret: run the chosen kernel in Pallas interpret mode (True, or a pltpu.InterpretParams for "tpu").
    Returns:
      o [B, T, H, V] in v's dtype and the final state [B, H, K, V] float32.
    """
    if impl == "auto":
        impl = _AUTO.get(jax.default_backend(), "reference")
    if impl == "reference":
        return lightning_attention_reference(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                             segment_ids=segment_ids, chunk_size=chunk_size)
    if impl not in _KERNELS:
        raise ValueError(f"impl must be 'auto', 'tpu', 'gpu' or 'reference'; got {impl!r}")
    check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size)
    b, t, h, dk = q.shape
    scale = float(dk ** -0.5 if scale is None else scale)
    state0 = (jnp.zeros((b, h, dk, v.shape[3]), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
    rel = chunk_relative_runs(segment_ids, b, t, chunk_size)
    return _kernel_attention(q, k, v, log_decay, state0, rel, scale, chunk_size, impl, interpret)
