"""Benchmark: MLA prefill attention at 1T shapes, flash kernel vs jnp reference.

Causal FLOPs count only the visible (query, key) pairs, P = Tq·(Tq+1)/2 for Tq == Tk, per batch row
and head:
  forward          2·B·H·P·(Dqk + Dv)        (q·kᵀ and p·v)
  forward+backward 2·B·H·P·(4·Dqk + 3·Dv)    (adds the recomputed q·kᵀ, do·vᵀ, pᵀ·do, dsᵀ·q, ds·k)
TFLOP/s is that count over the median wall time; "% peak" divides by the chip's dense bf16 peak
(benchmarks/peaks.py). On CPU only the reference runs, at small T: the kernels need a TPU or GPU.

  python benchmarks/mla_prefill.py                                  # accelerator: T = 4K .. 128K
  python benchmarks/mla_prefill.py --seq-lens 256 512 --heads 4     # CPU smoke run
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.timing import median_seconds  # noqa: E402
from benchmarks.peaks import detect_chip  # noqa: E402
from pallas_kernels.mla.attention import mla_attention  # noqa: E402


def causal_flops(batch, heads, t, dqk, dv, backward: bool) -> float:
  pairs = t * (t + 1) / 2
  return 2.0 * batch * heads * pairs * ((4 * dqk + 3 * dv) if backward else (dqk + dv))


def _step(impl, scale, backward):
  attend = lambda q, k, v: mla_attention(q, k, v, scale=scale, causal=True, impl=impl)
  if not backward:
    return jax.jit(attend)
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def run(args):
  chip = detect_chip()
  on_cpu = jax.default_backend() == "cpu"
  impls = ["reference"] if on_cpu else ["kernel", "reference"]
  if on_cpu:
    print("CPU backend: running the reference only; the flash kernels need a TPU or GPU.")
  dtype = jnp.dtype(args.dtype)
  scale = args.dqk ** -0.5
  rows = []
  for t in args.seq_lens:
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (args.batch, t, args.heads, args.dqk), dtype)
    k = jax.random.normal(keys[1], (args.batch, t, args.heads, args.dqk), dtype)
    v = jax.random.normal(keys[2], (args.batch, t, args.heads, args.dv), dtype)
    for impl in impls:
      if impl == "reference" and t > args.ref_max_t:
        continue
      for backward in (False, True):
        seconds = median_seconds(_step("auto" if impl == "kernel" else impl, scale, backward), q, k, v,
                                 iters=args.iters)
        tflops = causal_flops(args.batch, args.heads, t, args.dqk, args.dv, backward) / seconds / 1e12
        peak = tflops * 1e12 / chip.bf16_flops if chip else None
        rows.append(dict(t=t, impl=impl, mode="fwd+bwd" if backward else "fwd", ms=seconds * 1e3,
                         tflops=tflops, peak=peak))
        r = rows[-1]
        print(f"T={t:>7} {impl:>9} {r['mode']:>7} {r['ms']:>10.2f} ms {tflops:>8.1f} TFLOP/s "
              f"{'' if peak is None else f'{100 * peak:5.1f}% of {chip.name} bf16 peak'}", flush=True)
  return rows, chip


def plot(rows, chip, out: pathlib.Path, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for impl in sorted({r["impl"] for r in rows}):
    for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
      pts = [(r["t"], r["tflops"]) for r in rows if r["impl"] == impl and r["mode"] == mode]
      if pts:
        ax.plot(*zip(*pts), style, label=f"{impl} {mode}")
  if chip:
    ax.axhline(chip.bf16_flops / 1e12, color="gray", lw=0.8, ls=":", label=f"{chip.name} bf16 peak")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length T")
  ax.set_ylabel("TFLOP/s (causal FLOPs)")
  ax.set_title(f"MLA prefill attention, B={args.batch} H={args.heads} Dqk={args.dqk} Dv={args.dv} "
               f"{args.dtype} on {jax.devices()[0].device_kind}", fontsize=9)
  ax.legend(fontsize=8)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120, bbox_inches="tight")
  print(f"wrote {out}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                      help="sequence lengths (default 4K..128K on an accelerator, 256 512 on CPU)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=None, help="default 64 (4 on CPU)")
  parser.add_argument("--dqk", type=int, default=192)
  parser.add_argument("--dv", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--ref-max-t", type=int, default=16384, help="longest T for the reference")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/mla_prefill.png"))
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  if args.seq_lens is None:
    args.seq_lens = [256, 512] if on_cpu else [4096 * 2**i for i in range(6)]
  if args.heads is None:
    args.heads = 4 if on_cpu else 64
  rows, chip = run(args)
  plot(rows, chip, args.out, args)


if __name__ == "__main__":
  main()
