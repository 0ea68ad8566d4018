"""What each remat policy costs: temporary memory and time of one gradient step, side by side.

For `none`, `dots` and `full`, plus plain autodiff's keep-everything as the baseline `none` departs from, prints the
compiled gradient's temporary memory (XLA's own buffer assignment) and the median step time, each relative to
keep-everything. `python benchmarks/remat.py [--layers 16] [--batch 4] [--seq 512] [--repeats 7]`.
"""
import argparse
import statistics
import time

import jax
from flax import nnx

import ling
import ling.stack
from compile_time import sized_config


def measure(c: ling.LingConfig, remat: str, ids, repeats: int) -> tuple[float, float]:
    """-> (temporary MiB, median seconds) of jit(value_and_grad(mean logit))."""
    graphdef, state = nnx.split(ling.LingModel(c, rngs=nnx.Rngs(0), remat=remat))
    step = jax.jit(jax.value_and_grad(lambda s, x: nnx.merge(graphdef, s)(x).mean()))
    compiled = step.lower(state, ids).compile()
    jax.block_until_ready(compiled(state, ids))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, ids))
        times.append(time.perf_counter() - t0)
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    h = a.hidden
    c = sized_config(a.layers, h, group=8, dense_layers=1)
    ids = jax.random.randint(jax.random.key(0), (a.batch, a.seq), 0, c.vocab_size)
    keep_costly = ling.stack._keep_costly
    ling.stack._keep_costly = jax.checkpoint_policies.everything_saveable  # `none` without its recompute list
    base = measure(c, "none", ids, a.repeats)
    ling.stack._keep_costly = keep_costly
    print(f"{a.layers} layers, hidden {h}, {a.batch} x {a.seq} tokens, {jax.devices()[0].platform}")
    print(f"{'policy':14} {'temp MiB':>9} {'step s':>8} {'memory':>7} {'time':>6}")
    print(f"{'keep-all':14} {base[0]:9.0f} {base[1]:8.3f} {1:7.2f}x {1:5.2f}x")
    for remat in ("none", "dots", "full"):
        mib, seconds = measure(c, remat, ids, a.repeats)
        print(f"{remat:14} {mib:9.0f} {seconds:8.3f} {mib / base[0]:7.2f}x {seconds / base[1]:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
