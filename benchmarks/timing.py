"""Wall-clock timing shared by the benchmarks."""
import statistics
import time

import jax


def median_seconds(fn, *args, iters: int) -> float:
    """Median seconds of `fn(*args)` over `iters` runs, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
