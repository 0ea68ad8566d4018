"""Grouped matmul: every impl vs a float64 per-group numpy loop, forward and gradients; 1T lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm import gmm, gmm_reference


def gmm_float64(lhs, rhs, group_sizes, dout):
  """(out, dlhs, drhs) of sum(out * dout) by an explicit loop over groups."""
  lhs, rhs, dout = (np.asarray(x, np.float64) for x in (lhs, rhs, dout))
  out, dlhs, drhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros(lhs.shape), np.zeros(rhs.shape)
  start = 0
  for g, n in enumerate(np.asarray(group_sizes)):
    rows = slice(start, start + n)
    out[rows] = lhs[rows] @ rhs[g]
    dlhs[rows] = dout[rows] @ rhs[g].T
    drhs[g] = lhs[rows].T @ dout[rows]
    start += n
  return out, dlhs, drhs


CASES = {
    # M=100 is not a multiple of any tile; group 1 and 5 are empty; rows 95.. belong to no group.
    "ragged": dict(m=100, k=64, n=48, group_sizes=[30, 0, 17, 40, 8, 0]),
    # Two 512-row tiles with groups straddling the tile boundary; K, N multiples of 128.
    "tiled": dict(m=1024, k=256, n=128, group_sizes=[300, 400, 0, 324]),
}
IMPLS = {"reference": False, "gpu": False, "tpu": True}


def make_case(seed, m, k, n, group_sizes, dtype):
  rng = np.random.default_rng(seed)
  g = len(group_sizes)
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  rhs = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
  dout = jnp.asarray(rng.standard_normal((m, n)), dtype)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), dout


def check_against_loop(impl, interpret, case, dtype, tol):
  lhs, rhs, group_sizes, dout = make_case(0, dtype=dtype, **case)
  out, vjp = jax.vjp(lambda a, b: gmm(a, b, group_sizes, impl=impl, interpret=interpret), lhs, rhs)
  dlhs, drhs = vjp(dout)
  assert out.dtype == dlhs.dtype == drhs.dtype == dtype
  for got, want in zip((out, dlhs, drhs), gmm_float64(lhs, rhs, group_sizes, dout)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_matches_loop_float32(impl, case):
  check_against_loop(impl, IMPLS[impl], CASES[case], jnp.float32, 1e-4)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_matches_loop_bfloat16(impl):
  # bf16 output rounding: ~3 significant digits on O(1)..O(10) values.
  check_against_loop(impl, IMPLS[impl], CASES["ragged"], jnp.bfloat16, 5e-2)


def test_tpu_under_tpu_simulator():
  # The simulator raises on out-of-bounds reads (e.g. of the padded rows) and NaN-fills VMEM.
  check_against_loop("tpu", pltpu.InterpretParams(), dict(m=40, k=128, n=128, group_sizes=[9, 0, 20]),
                     jnp.float32, 1e-4)


def test_gpu_forward_under_mosaic_gpu_simulator():
  # The only CPU run of the Mosaic GPU (wgmma) forward: bf16, K and N multiples of 128, M=300 not a
  # tile multiple, an empty group and rows past the sum. The simulator cannot run the backward
  # kernels (no transpose_ref/layout_cast support), and the drhs kernel reads the SM count of a real
  # GPU while tracing.
  from jax._src.pallas.mosaic_gpu.interpret.params import force_gpu_interpret_mode
  lhs, rhs, group_sizes, dout = make_case(3, 300, 128, 256, [100, 0, 150, 30], jnp.bfloat16)
  with force_gpu_interpret_mode():
    out = gmm(lhs, rhs, group_sizes, impl="gpu")
  want = gmm_float64(lhs, rhs, group_sizes, dout)[0]
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=5e-2, rtol=5e-2)


def test_grad_matches_reference_autodiff():
  lhs, rhs, group_sizes, dout = make_case(1, dtype=jnp.float32, **CASES["ragged"])
  loss = lambda f: lambda a, b: jnp.sum(f(a, b) * dout)
  want = jax.grad(loss(lambda a, b: gmm_reference(a, b, group_sizes)), (0, 1))(lhs, rhs)
  for impl, interpret in IMPLS.items():
    got = jax.jit(jax.grad(loss(lambda a, b: gmm(a, b, group_sizes, impl=impl, interpret=interpret)),
                           (0, 1)))(lhs, rhs)
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4, err_msg=impl)


def test_bad_arguments():
  lhs, rhs, group_sizes, _ = make_case(2, dtype=jnp.float32, **CASES["ragged"])
  with pytest.raises(ValueError, match="impl"):
    gmm(lhs, rhs, group_sizes, impl="triton")
  with pytest.raises(ValueError, match="rhs"):
    gmm(lhs, rhs[:, :8], group_sizes)
  with pytest.raises(ValueError, match="group_sizes"):
    gmm(lhs, rhs, group_sizes[:2])
  with pytest.raises(ValueError, match="group_sizes"):
    gmm(lhs, rhs, group_sizes.astype(jnp.int16))
  with pytest.raises(ValueError, match="lhs"):
    gmm(lhs[None], rhs, group_sizes)


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
def test_lowers_at_1t_expert_shapes(platform, impl):
  # Ling 1T experts: hidden 8192, expert intermediate 2048, 256 experts; 512 tokens x top-8 rows.
  m, k, n, g = 512 * 8, 8192, 2048, 256
  sds = jax.ShapeDtypeStruct
  lhs, rhs, gs = sds((m, k), jnp.bfloat16), sds((g, k, n), jnp.bfloat16), sds((g,), jnp.int32)

  def fwd_bwd(lhs, rhs, group_sizes):
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, group_sizes, impl=impl), lhs, rhs)
    return out, vjp(out)

  if platform == "tpu":
    text = jax.jit(fwd_bwd).trace(lhs, rhs, gs).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("tpu_custom_call") >= 3  # gmm forward, gmm dlhs, tgmm drhs
  else:
    # Forward only: jax's bundled transposed_ragged_dot (drhs) reads the GPU's SM count while
    # tracing, which a CPU host cannot provide; the backward was checked on an H200 instead.
    fwd = lambda a, b, group_sizes: gmm(a, b, group_sizes, impl=impl)
    text = jax.jit(fwd).trace(lhs, rhs, gs).lower(lowering_platforms=(platform,)).as_text()
    assert "mosaic_gpu" in text
