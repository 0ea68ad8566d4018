"""Benchmark: paged MLA decode kernel vs the jnp reference, and grouped expert matmul vs ragged_dot.

Defaults are Ling 1T shapes (64 heads, kv_lora_rank 512, rope 64, bf16, 256-token pages) over
contexts 4K..1M and batches 1..64, skipping any point whose cache exceeds --max-cache-gb.
On CPU only the reference runs, at small sizes: the kernels need a TPU or GPU.

  python benchmarks/mla_decode.py                                  # accelerator, full sweep
  python benchmarks/mla_decode.py --contexts 4096 --batches 1 --heads 4 --rank 32 --rope 8 \
      --gmm-tokens 64 --hidden 256 --inter 128 --experts 8          # quick CPU run
"""
import argparse
import functools
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds  # noqa: E402
from benchmarks.peaks import detect_chip  # noqa: E402
from pallas_kernels.gmm import gmm  # noqa: E402
from pallas_kernels.mla.decode import mla_decode  # noqa: E402
from pallas_kernels.mla.decode_gpu import mla_decode_gpu  # noqa: E402


def decode_inputs(batch, context, a, dtype):
  """Shuffled page tables over a pool of exactly batch·context/page_size pages, all full."""
  pages_per_seq = -(-context // a.page_size)
  num_pages = batch * pages_per_seq
  k = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(k[0], (batch, a.heads, a.rank), dtype)
  qr = jax.random.normal(k[1], (batch, a.heads, a.rope), dtype)
  latent = jax.random.normal(k[2], (num_pages, a.page_size, a.rank), dtype)
  rope = jax.random.normal(k[3], (num_pages, a.page_size, a.rope), dtype)
  page_table = jax.random.permutation(k[4], num_pages).astype(jnp.int32).reshape(batch, pages_per_seq)
  lengths = jnp.full((batch,), context, jnp.int32)
  return q, qr, latent, rope, page_table, lengths


def bench_decode(a, impls, peak, dtype):
  rows = []
  itemsize = jnp.dtype(dtype).itemsize
  for batch in a.batches:
    for context in a.contexts:
      cache_bytes = batch * context * (a.rank + a.rope) * itemsize
      if cache_bytes > a.max_cache_gb * 2**30:
        continue
      args = decode_inputs(batch, context, a, dtype)
      io_bytes = cache_bytes + batch * a.heads * (2 * a.rank + a.rope) * itemsize
      flops = 2 * batch * a.heads * context * (2 * a.rank + a.rope)
      outs = {}
      for impl in impls:
        fn = jax.jit(functools.partial(mla_decode, scale=(a.rank + a.rope) ** -0.5, impl=impl))
        outs[impl] = fn(*args)
        t = median_seconds(fn, *args, iters=a.iters)
        gbs = io_bytes / t / 1e9
        rows.append(dict(impl=impl, batch=batch, context=context, ms=t * 1e3, gbs=gbs,
                         hbm=gbs * 1e9 / peak.hbm_bytes_per_s if peak else float("nan"),
                         tflops=flops / t / 1e12))
        r = rows[-1]
        print(f"{impl:>9} B={batch:<3} ctx={context:<8} {r['ms']:9.3f} ms {gbs:8.1f} GB/s "
              f"{r['hbm']:6.1%} HBM {r['tflops']:7.2f} TFLOP/s", flush=True)
      if len(outs) == 2:
        kernel_out, ref_out = (np.asarray(o, np.float32) for o in outs.values())
        print(f"          max |kernel - reference| = {np.abs(kernel_out - ref_out).max():.3g}")
      del args, outs
  return rows


def bench_gmm(a, impls, peak, dtype):
  m = a.gmm_tokens * a.topk
  k = jax.random.split(jax.random.key(1), 3)
  lhs = jax.random.normal(k[0], (m, a.hidden), dtype)
  rhs = jax.random.normal(k[1], (a.experts, a.hidden, a.inter), dtype) * a.hidden**-0.5
  # Uneven routing: a random split of the rows over experts, some experts empty.
  cuts = jnp.sort(jax.random.randint(k[2], (a.experts - 1,), 0, m + 1))
  group_sizes = jnp.diff(jnp.concatenate([jnp.zeros(1, cuts.dtype), cuts, jnp.full(1, m, cuts.dtype)]))
  group_sizes = group_sizes.astype(jnp.int32)
  flops = 2 * m * a.hidden * a.inter
  rows = []
  fns = {impl: functools.partial(gmm, impl=impl) for impl in impls}
  fns["ragged_dot"] = lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32).astype(x.dtype)
  for name, f in fns.items():
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda x, w, gs, f=f: jnp.sum(f(x, w, gs).astype(jnp.float32)), (0, 1)))
    for mode, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", grad, 3)):
      try:
        t = median_seconds(fn, lhs, rhs, group_sizes, iters=a.iters)
      except jax.errors.JaxRuntimeError as e:  # XLA's GPU ragged_dot runs out of memory at 1T shapes
        print(f"gmm {name:>10} {mode:<8} failed: {str(e).splitlines()[0][:200]}", flush=True)
        continue
      tf = mult * flops / t / 1e12
      mfu = tf * 1e12 / peak.bf16_flops if peak else float("nan")
      rows.append(dict(impl=name, mode=mode, ms=t * 1e3, tflops=tf, mfu=mfu))
      print(f"gmm {name:>10} {mode:<8} M={m} K={a.hidden} N={a.inter} G={a.experts}: {t * 1e3:9.3f} ms "
            f"{tf:7.1f} TFLOP/s {mfu:6.1%} of peak", flush=True)
  return rows


def sweep_gpu(a, dtype):
  """Times GPU kernel launch variants, to pick mla_decode_gpu's defaults on a new chip."""
  scale = (a.rank + a.rope) ** -0.5
  for batch in a.batches:
    for context in a.contexts:
      args = decode_inputs(batch, context, a, dtype)
      for block_h, block_n, num_warps in itertools.product((16, 32, 64), (32, 64), (4, 8)):
        fn = jax.jit(functools.partial(mla_decode_gpu, scale=scale, block_h=block_h, block_n=block_n,
                                       num_warps=num_warps))
        try:
          t = median_seconds(fn, *args, iters=a.iters)
        except Exception as e:  # a variant may exceed shared memory or registers: report and go on
          print(f"sweep B={batch} ctx={context} h{block_h} n{block_n} w{num_warps}: "
                f"{type(e).__name__}", flush=True)
          continue
        cache_bytes = batch * context * (a.rank + a.rope) * jnp.dtype(dtype).itemsize
        print(f"sweep B={batch} ctx={context} h{block_h} n{block_n} w{num_warps}: "
              f"{t * 1e3:8.3f} ms {cache_bytes / t / 1e9:7.1f} GB/s", flush=True)


def plot(rows, peak, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for (impl, batch) in sorted({(r["impl"], r["batch"]) for r in rows}):
    pts = sorted((r["context"], r["gbs"]) for r in rows if r["impl"] == impl and r["batch"] == batch)
    ax.plot(*zip(*pts), marker="o", linestyle="-" if impl != "reference" else "--", label=f"{impl} B={batch}")
  if peak:
    ax.axhline(peak.hbm_bytes_per_s / 1e9, color="k", linewidth=0.8, label=f"{peak.name} HBM peak")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context tokens")
  ax.set_ylabel("GB/s (latent + rope pages + q/o)")
  ax.set_title("MLA paged decode")
  ax.legend(fontsize=7)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  print(f"wrote {path}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
  p.add_argument("--heads", type=int, default=64)
  p.add_argument("--rank", type=int, default=512, help="kv_lora_rank R")
  p.add_argument("--rope", type=int, default=64, help="rope head dim P")
  p.add_argument("--page-size", type=int, default=256)
  p.add_argument("--max-cache-gb", type=float, default=24.0, help="skip points whose cache is larger")
  p.add_argument("--gmm-tokens", type=int, default=4096, help="tokens routed (rows = tokens x top-k)")
  p.add_argument("--topk", type=int, default=8)
  p.add_argument("--hidden", type=int, default=8192)
  p.add_argument("--inter", type=int, default=2048, help="expert intermediate size")
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--skip-gmm", action="store_true")
  p.add_argument("--sweep", action="store_true", help="GPU only: time kernel launch variants and exit")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "mla_decode.png"))
  a = p.parse_args(argv)
  backend = jax.default_backend()
  peak = detect_chip()
  print(f"backend={backend} device={jax.devices()[0].device_kind} peak={peak.name if peak else 'unknown'}")
  if backend == "cpu":
    print("CPU: timing the jnp reference only; the Pallas kernels need a TPU or GPU.")
    impls = ["reference"]
  else:
    impls = [{"tpu": "tpu", "gpu": "gpu"}[backend], "reference"]
  if a.sweep:
    sweep_gpu(a, jnp.bfloat16)
    return
  rows = bench_decode(a, impls, peak, jnp.bfloat16)
  if rows:
    plot(rows, peak, a.out)
  if not a.skip_gmm:
    bench_gmm(a, impls[:1], peak, jnp.bfloat16)


if __name__ == "__main__":
  main()
