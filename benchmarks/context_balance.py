"""Causal MLA work per context shard: contiguous chunks vs the zig-zag order the model uses.

Counts the (block_q x block_k) score blocks the flash kernels visit (they skip the blocks after each query piece's
causal offset) on each of n shards for a sequence of T tokens, and prints the busiest shard's work relative to the
mean (1.00 = balanced) and to an unsplit sequence's total / n. `python benchmarks/context_balance.py [--tokens N]`.
"""
import argparse


def visited_blocks(tq: int, tk: int, offset: int, block_q: int, block_k: int) -> int:
    """Score blocks a causal flash kernel visits for tq queries at key position `offset` against tk keys."""
    n_k = -(-tk // block_k)
    return sum(min(n_k, (offset + (i + 1) * block_q - 1) // block_k + 1) for i in range(-(-tq // block_q)))


def shard_work(t: int, n: int, zigzag: bool, block_q: int, block_k: int) -> list[int]:
    if zigzag:
        c = t // (2 * n)
        return [visited_blocks(c, t, j * c, block_q, block_k) + visited_blocks(c, t, (2 * n - 1 - j) * c, block_q,
                                                                               block_k) for j in range(n)]
    c = t // n
    return [visited_blocks(c, t, j * c, block_q, block_k) for j in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--shards", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--block", type=int, default=512, help="block_q = block_k")
    a = p.parse_args()
    whole = visited_blocks(a.tokens, a.tokens, 0, a.block, a.block)
    print(f"T = {a.tokens}, blocks {a.block}: busiest shard / mean, and busiest shard / (unsplit total / n)")
    for n in a.shards:
        row = []
        for zigzag in (False, True):
            w = shard_work(a.tokens, n, zigzag, a.block, a.block)
            row.append(f"{'zig-zag' if zigzag else 'contiguous'} {max(w) / (sum(w) / n):.2f} / {max(w) * n / whole:.2f}")
        print(f"n = {n:3d}: " + "   ".join(row))


if __name__ == "__main__":
    main()
