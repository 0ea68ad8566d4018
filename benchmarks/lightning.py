"""Benchmark: lightning attention at the 1T shape (H=64, K=V=128, B=1, bf16), the backend's kernel vs the jnp reference.

FLOPs counted are those of the chunked algorithm (chunk C, N = ceil(T / C) chunks) with every C x C tile taken
dense, per batch row and head:
  forward           N·(2·C²·(K+V) + 4·C·K·V)     q·kᵀ, scores·v, q·S, kᵀ·v
  forward+backward  N·(8·C²·(K+V) + 14·C·K·V)    + dq: do·vᵀ, dp·k, do·Sᵀ, recomputed kᵀ·v;
                                                 dk/dv: v·doᵀ, dpᵀ·q, v·dSᵀ, k·qᵀ, sᵀ·do, k·dS, qᵀ·do
Work repeated by an implementation (the q·kᵀ of each V block of the GPU kernel) is not counted. TFLOP/s is that
count over the median wall time; "% peak" divides by the chip's dense bf16 peak (benchmarks/peaks.py).
On CPU only the reference runs, at small T: the kernels need a TPU or GPU.

  python benchmarks/lightning.py                            # accelerator: T = 4K .. 256K
  python benchmarks/lightning.py --max-t 8192 --heads 4     # CPU smoke run
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.timing import median_seconds  # noqa: E402
from benchmarks.peaks import detect_chip  # noqa: E402
from pallas_kernels.lightning import lightning_attention  # noqa: E402


def chunked_flops(batch, heads, t, dk, dv, chunk, backward: bool) -> float:
    n = -(-t // chunk)
    if backward:
        return batch * heads * n * (8.0 * chunk**2 * (dk + dv) + 14.0 * chunk * dk * dv)
    return batch * heads * n * (2.0 * chunk**2 * (dk + dv) + 4.0 * chunk * dk * dv)


def make_step(impl, chunk, backward):
    attend = lambda q, k, v, g: lightning_attention(q, k, v, g, chunk_size=chunk, impl=impl)
    if not backward:
        return jax.jit(attend)

    def loss(q, k, v, g):
        o, state = attend(q, k, v, g)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check_kernel(args, dtype):
    """Largest error of the kernel's forward and gradients against the reference at a small ragged shape."""
    b, t, h = 2, 1000, 3
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (b, t, h, args.head_dim), dtype) for key in keys[:3])
    w_o = jax.random.normal(keys[4], (b, t, h, args.head_dim))
    g = -jnp.linspace(0.01, 2.0, h)
    seg = jnp.cumsum(jax.random.bernoulli(keys[3], 0.01, (b, t)).astype(jnp.int32), axis=1)

    def grads(impl):
        fn = lambda q, k, v: lightning_attention(q, k, v, g, segment_ids=seg, chunk_size=args.chunk, impl=impl)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v)[0].astype(jnp.float32) * w_o) + jnp.sum(fn(q, k, v)[1])
        return (fn(q, k, v)[0],) + jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, a, r in zip(["o", "dq", "dk", "dv"], grads("auto"), grads("reference")):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        print(f"check {jnp.dtype(dtype).name} {name}: max |kernel - reference| / max |reference| = "
              f"{np.abs(a - r).max() / np.abs(r).max():.2e}")


def run(args):
    chip = detect_chip()
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.dtype(args.dtype)
    if on_cpu:
        print("CPU backend: running the jnp reference only; the lightning kernels need a TPU or GPU.")
        impls = ["reference"]
    else:
        impls = ["kernel"] + (["reference"] if not args.skip_reference else [])
        if args.check:
            for check_dtype in (jnp.float32, dtype):
                check_kernel(args, check_dtype)
    max_t = min(args.max_t, args.cpu_max_t) if on_cpu else args.max_t
    seq_lens = [t for t in (2**p for p in range(12, 19)) if args.min_t <= t <= max_t]
    rows = []
    for t in seq_lens:
        keys = jax.random.split(jax.random.key(t), 3)
        q, k = (jax.random.normal(key, (args.batch, t, args.heads, args.head_dim), dtype) for key in keys[:2])
        v = jax.random.normal(keys[2], (args.batch, t, args.heads, args.head_dim), dtype)
        g = -jnp.linspace(0.01, 1.0, args.heads)
        for impl in impls:
            if impl == "reference" and t > args.ref_max_t:
                continue
            for backward in (False, True):
                step = make_step("auto" if impl == "kernel" else "reference", args.chunk, backward)
                seconds = median_seconds(step, q, k, v, g, iters=args.iters)
                tflops = chunked_flops(args.batch, args.heads, t, args.head_dim, args.head_dim, args.chunk,
                                       backward) / seconds / 1e12
                peak = f"{100 * tflops * 1e12 / chip.bf16_flops:6.2f}" if chip else "   n/a"
                mode = "fwd+bwd" if backward else "fwd"
                rows.append((impl, mode, t, seconds, tflops))
                print(f"{impl:9s} {mode:7s} T={t:7d}  {seconds * 1e3:10.3f} ms  {tflops:8.2f} TFLOP/s  "
                      f"{peak} % peak  {seconds / t * 1e9:9.2f} ns/token", flush=True)
    plot(rows, args, chip)


def plot(rows, args, chip):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl, mode in sorted({(r[0], r[1]) for r in rows}):
        sel = [r for r in rows if r[:2] == (impl, mode)]
        ts = [r[2] for r in sel]
        ax_time.plot(ts, [r[3] * 1e3 for r in sel], "o-", label=f"{impl} {mode}")
        ax_rate.plot(ts, [r[4] for r in sel], "o-", label=f"{impl} {mode}")
    for ax, label in ((ax_time, "median time (ms)"), (ax_rate, "TFLOP/s (chunked algorithm)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_time.set_yscale("log")
    device = chip.name if chip else jax.devices()[0].device_kind
    fig.suptitle(f"lightning attention, B={args.batch} H={args.heads} K=V={args.head_dim} C={args.chunk} "
                 f"{args.dtype} on {device}")
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"plot saved to {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-t", type=int, default=4096)
    parser.add_argument("--max-t", type=int, default=262144)
    parser.add_argument("--cpu-max-t", type=int, default=8192, help="cap on T when only the CPU is available")
    parser.add_argument("--ref-max-t", type=int, default=262144, help="largest T for the jnp reference")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128, help="K = V")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--check", action="store_true", help="compare the kernel with the reference before timing")
    parser.add_argument("--out", default="benchmarks/out/lightning.png")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
