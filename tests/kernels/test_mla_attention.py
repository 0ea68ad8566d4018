"""MLA flash attention: reference vs float64 numpy, kernels (interpret mode) vs reference, 1T lowering;
each also with an explicit causal q_offset, traced where it reaches a kernel."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla.attention import mla_attention
from pallas_kernels.mla.attention_reference import mla_attention_reference

# Tolerances on max|kernel - reference| / max|reference|. fp32 kernels measure ~1e-6. With bf16
# inputs the kernels feed bf16 probabilities to the p·v and ds·k matmuls and round o, dq, dk, dv to
# bf16 while the reference keeps fp32 until the final cast: a few bf16 ulps of the largest entry.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small tiles so every case spans several q and kv blocks (the TPU kernel needs multiples of 128).
BLOCKS = {"tpu": dict(block_q=128, block_k=128), "gpu": dict(block_q=64, block_k=32)}


def naive_attention_f64(q, k, v, scale, q_seg, kv_seg, causal, q_offset=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, tq, h, _ = q.shape
  tk = k.shape[1]
  q_offset = tk - tq if q_offset is None else q_offset
  o = np.zeros((b, tq, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      for i in range(tq):
        visible = np.ones(tk, bool)
        if causal:
          visible &= np.arange(tk) <= q_offset + i
        if q_seg is not None:
          visible &= kv_seg[bi] == q_seg[bi, i]
        if visible.any():
          s = scale * k[bi, visible, hi] @ q[bi, i, hi]
          p = np.exp(s - s.max())
          o[bi, i, hi] = p @ v[bi, visible, hi] / p.sum()
  return o


def make_inputs(seed, b, tq, tk, h, dqk, dv, n_seg, dtype=jnp.float32, orphan_rows=0, q_offset=None):
  """q, k, v and (q_seg, kv_seg) with sorted segments; `orphan_rows` queries get an id no key has.

  Queries take the segment ids of keys q_offset .. q_offset + Tq - 1 (None: the last Tq keys).
  """
  rng = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  q, k, v = mk(b, tq, h, dqk), mk(b, tk, h, dqk), mk(b, tk, h, dv)
  if not n_seg:
    return q, k, v, None
  kv_seg = np.sort(rng.integers(0, n_seg, (b, tk)), axis=1).astype(np.int32)
  q_offset = tk - tq if q_offset is None else q_offset
  q_seg = kv_seg[:, q_offset:q_offset + tq].copy()
  q_seg[:, :orphan_rows] = n_seg + 7
  return q, k, v, (jnp.asarray(q_seg), jnp.asarray(kv_seg))


@pytest.mark.parametrize("tq,tk,n_seg,causal", [(37, 37, 0, True), (37, 50, 3, True), (37, 50, 3, False),
                                                (64, 64, 4, True), (20, 50, 0, False)])
def test_reference_matches_float64(tq, tk, n_seg, causal):
  q, k, v, segs = make_inputs(0, 2, tq, tk, 3, 24, 16, n_seg, orphan_rows=2 if n_seg else 0)
  o = mla_attention_reference(q, k, v, scale=0.2, segment_ids=segs, causal=causal, block_q=16)
  expected = naive_attention_f64(q, k, v, 0.2, *(segs or (None, None)), causal)
  np.testing.assert_allclose(np.asarray(o), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_seg", [0, 3])
@pytest.mark.parametrize("q_offset", [0, 13, 30])  # Tq=20, Tk=50: the first, a middle and the last offset
def test_reference_matches_float64_with_q_offset(q_offset, n_seg):
  q, k, v, segs = make_inputs(6, 2, 20, 50, 3, 24, 16, n_seg, q_offset=q_offset)
  o = mla_attention_reference(q, k, v, scale=0.2, segment_ids=segs, q_offset=q_offset, block_q=16)
  expected = naive_attention_f64(q, k, v, 0.2, *(segs or (None, None)), True, q_offset)
  np.testing.assert_allclose(np.asarray(o), expected, atol=2e-6, rtol=0)


def test_reference_single_segment_array_and_empty_rows():
  q, k, v, (q_seg, kv_seg) = make_inputs(1, 1, 40, 40, 2, 8, 8, 3)
  o_tuple = mla_attention_reference(q, k, v, scale=0.3, segment_ids=(kv_seg, kv_seg))
  o_array = mla_attention_reference(q, k, v, scale=0.3, segment_ids=kv_seg)
  np.testing.assert_array_equal(np.asarray(o_tuple), np.asarray(o_array))
  orphan = q_seg.at[:, :5].set(99)
  o = mla_attention_reference(q, k, v, scale=0.3, segment_ids=(orphan, kv_seg))
  assert np.all(np.asarray(o[:, :5]) == 0.0)
  grads = jax.grad(lambda q: mla_attention_reference(q, k, v, scale=0.3, segment_ids=(orphan, kv_seg)).sum())(q)
  assert np.isfinite(np.asarray(grads)).all()


def _outputs_and_grads(attend):
  """jit'd (q, k, v, segs, q_offset, w) -> (o, dq, dk, dv) for the loss sum(o * w). Every argument is
  traced, q_offset included, so one compilation serves all offsets of a shape."""
  def run(q, k, v, segs, q_offset, w):
    forward = lambda q, k, v: attend(q, k, v, segment_ids=segs, q_offset=q_offset)
    loss = lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32) * w)
    return (forward(q, k, v),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return jax.jit(run)


def _comparison(impl, causal, interpret=True, blocks=None):
  """A function (q, k, v, segs, q_offset=None) -> (errors, kernel o), errors holding
  max|kernel - reference| / max|reference| for o, dq, dk, dv under a random linear functional of o."""
  kernel = _outputs_and_grads(functools.partial(mla_attention, scale=0.3, causal=causal, impl=impl,
                                                interpret=interpret, **(blocks or BLOCKS[impl])))
  reference = _outputs_and_grads(functools.partial(mla_attention_reference, scale=0.3, causal=causal))

  def compare(q, k, v, segs, q_offset=None):
    w = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape[:3] + v.shape[3:]), jnp.float32)
    results = [f(q, k, v, segs, q_offset, w) for f in (kernel, reference)]
    errors = {}
    for name, got, want in zip(("o", "dq", "dk", "dv"), *results):
      assert got.shape == want.shape and got.dtype == want.dtype, name
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      assert np.isfinite(got).all(), name
      errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    return errors, results[0][0]
  return compare


KERNEL_CASES = {
    # name: (b, tq, tk, h, dqk, dv, n_seg, causal, dtype)
    "causal_T_not_block_multiple": (1, 300, 300, 2, 24, 16, 0, True, jnp.float32),
    "segments": (2, 300, 300, 2, 24, 16, 3, True, jnp.float32),
    "tq_lt_tk_segments": (1, 200, 333, 2, 24, 16, 2, True, jnp.float32),
    "non_causal_tq_lt_tk": (1, 260, 400, 2, 24, 16, 2, False, jnp.float32),
    "bf16_dqk192_dv128": (1, 256, 256, 2, 192, 128, 0, True, jnp.bfloat16),
}


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_matches_reference(impl, case):
  b, tq, tk, h, dqk, dv, n_seg, causal, dtype = KERNEL_CASES[case]
  q, k, v, segs = make_inputs(list(KERNEL_CASES).index(case), b, tq, tk, h, dqk, dv, n_seg, dtype,
                              orphan_rows=3 if n_seg else 0)
  errors, o = _comparison(impl, causal)(q, k, v, segs)
  print(f"{impl} {case}: {errors}")
  assert max(errors.values()) < TOL[dtype], errors
  if n_seg:
    assert np.all(np.asarray(o[:, :3]) == 0.0)  # queries whose segment has no key


# (Tq, Tk, offsets): one q block and keys far past the last query, then several blocks each way.
OFFSET_CASES = [(40, 200, (0, 77, 160)), (300, 700, (0, 177, 400))]


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_matches_reference_with_traced_q_offset(impl):
  compare = _comparison(impl, causal=True)
  for seed, (tq, tk, q_offsets) in enumerate(OFFSET_CASES):
    for q_offset in q_offsets:
      q, k, v, segs = make_inputs(seed, 1, tq, tk, 2, 24, 16, 2, jnp.bfloat16, q_offset=q_offset)
      errors, _ = compare(q, k, v, segs, jnp.int32(q_offset))
      print(f"{impl} Tq={tq} Tk={tk} q_offset={q_offset}: {errors}")
      assert max(errors.values()) < TOL[jnp.bfloat16], (tq, tk, q_offset, errors)


def test_tpu_kernel_under_interpret_params():
  compare = _comparison("tpu", True, interpret=pltpu.InterpretParams())
  q, k, v, segs = make_inputs(3, 1, 200, 256, 1, 24, 16, 2)
  errors, _ = compare(q, k, v, segs)
  print(f"tpu InterpretParams: {errors}")
  assert max(errors.values()) < TOL[jnp.float32], errors
  q, k, v, segs = make_inputs(3, 1, 120, 256, 1, 24, 16, 2, q_offset=17)
  errors, _ = compare(q, k, v, segs, jnp.int32(17))
  print(f"tpu InterpretParams q_offset=17: {errors}")
  assert max(errors.values()) < TOL[jnp.float32], errors


def test_auto_on_cpu_is_reference():
  q, k, v, segs = make_inputs(4, 1, 30, 30, 2, 24, 16, 2)
  got = mla_attention(q, k, v, scale=0.1, segment_ids=segs)
  want = mla_attention_reference(q, k, v, scale=0.1, segment_ids=segs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("platform,impl,marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")])
@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("traced_q_offset", [False, True])
def test_lowers_for_hardware_at_1t_shapes(platform, impl, marker, with_segments, traced_q_offset):
  b, t, h = 1, 8192, 64
  # A traced offset stands for a context-parallel shard: a quarter of the queries against every key.
  tq = t // 4 if traced_q_offset else t
  args = [jax.ShapeDtypeStruct((b, tq, h, 192), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h, 192), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, h, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((), jnp.int32) if traced_q_offset else None]
  if with_segments:
    q_seg = jax.ShapeDtypeStruct((b, tq), jnp.int32)
    args.append((q_seg, jax.ShapeDtypeStruct((b, t), jnp.int32)) if traced_q_offset else q_seg)

  def forward(q, k, v, q_offset, seg=None):
    return mla_attention(q, k, v, scale=192 ** -0.5, segment_ids=seg, q_offset=q_offset, impl=impl)

  def value_and_grads(*a):
    loss = lambda q, k, v: forward(q, k, v, *a[3:]).astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(*a[:3])

  for fn, n_kernels in ((forward, 1), (value_and_grads, 3)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= n_kernels


def test_bad_arguments():
  q, k, v, _ = make_inputs(0, 1, 16, 16, 2, 24, 16, 0)
  with pytest.raises(ValueError, match="impl"):
    mla_attention(q, k, v, scale=1.0, impl="cudnn")
  with pytest.raises(ValueError, match=r"k must be .*\(1, 16, 2, 24\)"):
    mla_attention(q, k[..., :8], v, scale=1.0)
  with pytest.raises(ValueError, match="v must be"):
    mla_attention(q, k, v[:, :8], scale=1.0)
  with pytest.raises(ValueError, match="Tq must be <= Tk"):
    mla_attention(k, q[:, :8], v[:, :8], scale=1.0)
  with pytest.raises(ValueError, match="kv_segment_ids must have shape"):
    mla_attention(q, k, v, scale=1.0, segment_ids=(jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 9), jnp.int32)))
  with pytest.raises(ValueError, match="InterpretParams"):
    mla_attention(q, k, v, scale=1.0, impl="gpu", interpret=pltpu.InterpretParams())
  with pytest.raises(ValueError, match="multiple of 128"):
    mla_attention(q, k, v, scale=1.0, impl="tpu", interpret=True, block_q=100)


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_q_offset_out_of_range(impl):
  q, k, v, _ = make_inputs(0, 1, 10, 16, 2, 24, 16, 0)
  for q_offset in (7, -1):
    with pytest.raises(ValueError, match=rf"q_offset must lie in \[0, Tk - Tq\] = \[0, 6\] .*got {q_offset}"):
      mla_attention(q, k, v, scale=1.0, q_offset=q_offset, impl=impl, interpret=True)
  with pytest.raises(ValueError, match="q_offset must be an int"):
    mla_attention(q, k, v, scale=1.0, q_offset=2.0, impl=impl, interpret=True)
