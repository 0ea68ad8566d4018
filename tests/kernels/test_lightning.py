"""Lightning attention: jnp reference vs a float64 token loop, kernels (interpret mode on CPU, compiled on a GPU
machine for impl="gpu") vs the reference, and lowering of both kernels for real hardware at the 1T shape."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning import lightning_attention, lightning_attention_reference, lightning_decode_step

ON_CPU = jax.default_backend() == "cpu"


def loop_float64(q, k, v, log_decay, scale, state0=None, segment_ids=None):
    """The recurrence token by token in float64 numpy, written independently of the chunked code."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, dk = q.shape
    state = np.zeros((b, h, dk, v.shape[3])) if state0 is None else np.array(state0, np.float64)
    decay = np.exp(np.asarray(log_decay, np.float64))[None, :, None, None]
    o = np.zeros(v.shape)
    for i in range(t):
        if segment_ids is not None and i > 0:
            state[np.asarray(segment_ids)[:, i] != np.asarray(segment_ids)[:, i - 1]] = 0.0
        state = decay * state + np.einsum("bhk,bhv->bhkv", k[:, i], v[:, i])
        o[:, i] = scale * np.einsum("bhk,bhkv->bhv", q[:, i], state)
    return o, state


def make_inputs(seed, b, t, h, dk, dv, dtype=jnp.float32, segments=True, state=True):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
    log_decay = -rng.uniform(0.01, 2.0, h).astype(np.float32)
    log_decay[0] = -8.0  # strong decay: exp(+large) must never be formed
    seg = None
    if segments:  # sorted ids: several packed documents per row; row 0 starts a new one mid-chunk too
        seg = np.sort(rng.integers(0, 4, (b, t)), axis=1)
        seg[0, t // 2:] += 7
        seg = jnp.asarray(seg, jnp.int32)
    state0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32) if state else None
    return q, k, v, jnp.asarray(log_decay), state0, seg


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("b,t,h,dk,dv,segments,state", [(2, 77, 3, 16, 24, True, True),
                                                        (1, 40, 2, 32, 16, False, False),
                                                        (2, 33, 5, 16, 16, True, False)])
def test_reference_matches_float64_loop(chunk, b, t, h, dk, dv, segments, state):
    q, k, v, g, s0, seg = make_inputs(0, b, t, h, dk, dv, segments=segments, state=state)
    o, sf = lightning_attention_reference(q, k, v, g, initial_state=s0, segment_ids=seg, chunk_size=chunk)
    o_ref, s_ref = loop_float64(q, k, v, g, dk ** -0.5, s0, seg)
    assert o.dtype == jnp.float32 and sf.shape == (b, h, dk, dv)
    assert rel_err(o, o_ref) < 1e-6 and rel_err(sf, s_ref) < 1e-6


def test_reference_long_sequence_is_fast_and_exact():
    """T = 131072 (B=1, H=4, K=V=16) on CPU; documents restart near both ends so a float64 loop can check them."""
    b, t, h, d, n_tail = 1, 131072, 4, 16, 50
    q, k, v, g, _, _ = make_inputs(1, b, t, h, d, d, segments=False, state=False)
    seg = jnp.zeros((b, t), jnp.int32).at[:, n_tail:].set(1).at[:, t - n_tail:].set(2)
    start = time.perf_counter()
    o, sf = jax.jit(lambda *a: lightning_attention(*a[:4], segment_ids=a[4], impl="reference"))(q, k, v, g, seg)
    o.block_until_ready()
    assert time.perf_counter() - start < 30.0
    o_head, _ = loop_float64(q[:, :n_tail], k[:, :n_tail], v[:, :n_tail], g, d ** -0.5)
    o_tail, s_tail = loop_float64(q[:, -n_tail:], k[:, -n_tail:], v[:, -n_tail:], g, d ** -0.5)
    assert rel_err(o[:, :n_tail], o_head) < 1e-6
    assert rel_err(o[:, -n_tail:], o_tail) < 1e-6 and rel_err(sf, s_tail) < 1e-6


def test_decode_steps_match_reference():
    q, k, v, g, s0, _ = make_inputs(2, 2, 19, 3, 16, 32, segments=False)
    o_ref, s_ref = lightning_attention_reference(q, k, v, g, initial_state=s0, chunk_size=8)
    state, outs = s0, []
    for i in range(q.shape[1]):
        o_i, state = lightning_decode_step(q[:, i], k[:, i], v[:, i], g, state)
        outs.append(o_i)
    assert rel_err(jnp.stack(outs, 1), o_ref) < 1e-6 and rel_err(state, s_ref) < 1e-6


# (name, B, T, H, K, V, chunk, dtype, segments, initial state, tolerance relative to the largest magnitude)
KERNEL_CASES = [
    ("ragged_segments_state", 2, 77, 3, 16, 24, 16, jnp.float32, True, True, 2e-5),
    ("h5_k48_v16_no_state", 1, 64, 5, 48, 16, 16, jnp.float32, False, False, 2e-5),
    ("v_blocks", 1, 40, 1, 16, 128, 16, jnp.float32, True, True, 2e-5),
    # bf16 operands of every matmul (the state too) against the reference's float32 math on the same inputs.
    ("bf16", 1, 100, 2, 32, 64, 32, jnp.bfloat16, True, True, 3e-2),
]


def run_with_grads(fn, q, k, v, g, s0, seg, chunk, seed=3):
    """o, final state and the gradients (q, k, v, initial state) of a random linear functional of both."""
    rng = np.random.default_rng(seed)
    w_o = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((q.shape[0], q.shape[2], q.shape[3], v.shape[3])), jnp.float32)

    def loss(q, k, v, s0):
        o, sf = fn(q, k, v, g, initial_state=s0, segment_ids=seg, chunk_size=chunk)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(sf * w_s), (o, sf)

    argnums = (0, 1, 2, 3) if s0 is not None else (0, 1, 2)
    (_, (o, sf)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, s0)
    return (o, sf) + tuple(grads)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_reference(impl, case):
    _, b, t, h, dk, dv, chunk, dtype, segments, state, tol = case
    if impl == "gpu" and not ON_CPU and jax.default_backend() != "gpu":
        pytest.skip("the GPU kernel runs compiled on a GPU or interpreted on CPU")
    interpret = True if impl == "tpu" or ON_CPU else False
    inputs = make_inputs(4, b, t, h, dk, dv, dtype, segments, state)
    kernel = run_with_grads(lambda *a, **kw: lightning_attention(*a, **kw, impl=impl, interpret=interpret), *inputs,
                            chunk)
    ref = run_with_grads(lightning_attention_reference, *inputs, chunk)
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    errors = {n: rel_err(a, r) for n, a, r in zip(names, kernel, ref)}
    print(f"{impl} {case[0]}: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert all(e < tol for e in errors.values()), errors
    assert kernel[0].dtype == dtype and kernel[2].dtype == dtype


def test_tpu_kernels_under_interpret_params():
    """The TPU simulator checks out-of-bounds block reads and uninitialised (NaN-filled) scratch use."""
    inputs = make_inputs(5, 1, 40, 2, 16, 16)
    kernel = run_with_grads(
        lambda *a, **kw: lightning_attention(*a, **kw, impl="tpu", interpret=pltpu.InterpretParams()), *inputs, 16)
    ref = run_with_grads(lightning_attention_reference, *inputs, 16)
    for a, r in zip(kernel, ref):
        assert rel_err(a, r) < 2e-5


@pytest.mark.parametrize("impl,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_lowering_for_hardware_at_1t_shape(impl, platform):
    """Forward and backward lower for real TPU (Mosaic) / GPU (Triton) at B=1, H=64, K=V=128, T=8192, bf16."""
    b, t, h, d = 1, 8192, 64, 128
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def train_step(q, k, v, g, seg):
        def loss(q, k, v):
            o, sf = lightning_attention(q, k, v, g, segment_ids=seg, impl=impl)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)
        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    args = (spec(b, t, h, d), spec(b, t, h, d), spec(b, t, h, d), jax.ShapeDtypeStruct((h,), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))
    text = jax.jit(train_step).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    marker = "tpu_custom_call" if impl == "tpu" else "triton"
    assert text.count(marker) >= 3  # forward, dq, dk/dv


def test_log_decay_gets_zero_gradient_and_bad_input_raises():
    q, k, v, g, s0, seg = make_inputs(6, 1, 24, 2, 16, 16)
    out = lambda g: jnp.sum(lightning_attention(q, k, v, g, impl="tpu", interpret=True, chunk_size=8)[0])
    grad_g = jax.grad(out)(g)
    assert np.all(np.asarray(grad_g) == 0.0)
    with pytest.raises(ValueError, match="impl"):
        lightning_attention(q, k, v, g, impl="cuda")
    with pytest.raises(ValueError, match="log_decay"):
        lightning_attention(q, k, v, g[:1], impl="reference")
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, g, initial_state=s0[:, :1], impl="tpu", interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attention(q, k, v, g, chunk_size=24, impl="gpu", interpret=True)
    with pytest.raises(ValueError, match="segment_ids"):
        lightning_attention(q, k, v, g, segment_ids=seg[:, :5], impl="gpu", interpret=True)
