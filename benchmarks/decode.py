"""Benchmark: decode step latency and tokens/s against context length, hybrid vs all-MLA; cache bytes per step.

Measured: the model's single-token decode step over a paged cache (what the serving engine runs each step), for a
hybrid config (layer_group_size G: G-1 Lightning + 1 MLA) and the same model with layer_group_size=1 (all MLA).
The cache is allocated once at --max-context and donated to each step (in-place page writes, as in the engine);
only `lengths` changes between points, so each config compiles once and the work per step follows `lengths` (the
MLA decode loops stop at the longest sequence). This model has no GQA layer, so GQA is only
computed: 2 x kv_heads x head_dim values per token per layer.

Computed for Ling-2.5-1T (configs/ling-2.5-1t.yaml; GQA with --gqa-kv-heads, Ling 2.0's 8): cache bytes resident
per token and touched per decode step per sequence (MLA latent read; Lightning fp32 state read + written).

  python benchmarks/decode.py                        # CPU: tiny models, contexts 1K..128K
  python benchmarks/decode.py --max-context 16384 --steps 3 --out /tmp/decode.png
"""
import argparse
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds  # noqa: E402
from ling.cache import init_cache  # noqa: E402
from ling.config import LingConfig, load_yaml_config  # noqa: E402
from ling.model import LingModel  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, layer_group_size=4, group_norm_size=2, num_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=8,
            kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=1 << 20, rope_theta=10000.0, initializer_range=0.02, eos_token_id=None,
            pad_token_id=None)


def cache_bytes(c: LingConfig, context: int, *, kv_bytes: int = 2, gqa_kv_heads: int | None = None):
    """(bytes resident per token, bytes touched per decode step) of one sequence at `context` tokens. With
    gqa_kv_heads, every layer is taken as GQA with that many K/V heads of head_dim."""
    n = c.num_hidden_layers
    if gqa_kv_heads is not None:
        per_token = n * 2 * gqa_kv_heads * c.head_dim * kv_bytes
        return per_token, per_token * context
    n_mla = sum(c.is_mla_layer(i) for i in range(n))
    per_token = n_mla * (c.kv_lora_rank + c.qk_rope_head_dim) * kv_bytes
    state = (n - n_mla) * c.num_attention_heads * c.head_dim**2 * 4
    return per_token, per_token * context + 2 * state


def measure(c: LingConfig, contexts, batch: int, steps: int, page_size: int, dtype):
    """Median seconds per decode step at each context (batch rows all at that length)."""
    model = LingModel(c, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cache = init_cache(c, batch, max(contexts) + 1, dtype=dtype, page_size=page_size)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def step(p, tok, cache):
        out = nnx.merge(graphdef, p).forward(tok[:, None], cache=cache)
        return out.logits, out.cache

    tokens = jnp.zeros((batch,), jnp.int32)
    out = []
    for t in contexts:
        def run():  # every step decodes at position t: the cache is carried, its lengths reset
            nonlocal cache
            logits, cache = step(params, tokens, cache.replace(lengths=jnp.full((batch,), t, jnp.int32)))
            return logits

        out.append(median_seconds(run, iters=steps))
        print(f"  {c.layer_group_size=} context {t:>8,}: {out[-1] * 1e3:9.2f} ms/step", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-context", type=int, default=1024)
    p.add_argument("--max-context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--config", default=None, help="model to measure (default: a tiny hybrid, G=4, 8 layers)")
    p.add_argument("--big-config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                         "ling-2.5-1t.yaml"))
    p.add_argument("--gqa-kv-heads", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "decode.png"))
    args = p.parse_args(argv)
    hybrid = load_yaml_config(args.config) if args.config else LingConfig(**TINY)
    all_mla = dataclasses.replace(hybrid, layer_group_size=1)
    contexts = [1 << i for i in range(args.min_context.bit_length() - 1, args.max_context.bit_length())
                if args.min_context <= 1 << i <= args.max_context]
    dtype = jnp.dtype(args.dtype)
    print(f"{jax.devices()[0].device_kind}: decode step, batch {args.batch}, {args.dtype}; hybrid G="
          f"{hybrid.layer_group_size} vs all-MLA, {hybrid.num_hidden_layers} layers")
    t_hyb = measure(hybrid, contexts, args.batch, args.steps, args.page_size, dtype)
    t_mla = measure(all_mla, contexts, args.batch, args.steps, args.page_size, dtype)
    kvb = dtype.itemsize
    print(f"\n{'context':>9} {'hybrid ms':>10} {'tok/s':>9} {'all-MLA ms':>11} {'tok/s':>9} {'MLA/hyb':>8} | "
          f"cache bytes/step: {'hybrid':>10} {'all-MLA':>10} {'GQA*':>11}  (*computed, kv heads "
          f"{hybrid.num_key_value_heads})")
    rows = []
    for t, th, tm in zip(contexts, t_hyb, t_mla):
        b = [cache_bytes(cfg, t, kv_bytes=kvb, **kw)[1] for cfg, kw in
             ((hybrid, {}), (all_mla, {}), (hybrid, {"gqa_kv_heads": hybrid.num_key_value_heads}))]
        rows.append({"context": t, "hybrid_s": th, "all_mla_s": tm, "bytes": b})
        print(f"{t:>9,} {th * 1e3:>10.2f} {args.batch / th:>9.1f} {tm * 1e3:>11.2f} {args.batch / tm:>9.1f} "
              f"{tm / th:>8.2f} | {'':17s} {b[0]:>10,} {b[1]:>10,} {b[2]:>11,}")
    big = load_yaml_config(args.big_config)
    big_mla = dataclasses.replace(big, layer_group_size=1)
    big_contexts = [4096, 32768, 131072, 262144, 1 << 20]
    print(f"\nLing-2.5-1T per sequence (bf16 cache, fp32 Lightning state; GQA = {args.gqa_kv_heads} KV heads):")
    res = {name: cache_bytes(cfg, 1, **kw)[0] for name, cfg, kw in
           (("hybrid", big, {}), ("all-MLA", big_mla, {}), ("GQA", big, {"gqa_kv_heads": args.gqa_kv_heads}))}
    print("  resident per token: " + ", ".join(f"{k} {v / 1024:.2f} KiB" for k, v in res.items()))
    big_rows = []
    for t in big_contexts:
        h, m, g = (cache_bytes(cfg, t, **kw)[1] for cfg, kw in
                   ((big, {}), (big_mla, {}), (big, {"gqa_kv_heads": args.gqa_kv_heads})))
        big_rows.append((t, h, m, g))
        print(f"  context {t:>9,}: bytes/step hybrid {h / 2**30:7.2f} GiB, all-MLA {m / 2**30:7.2f} GiB, GQA "
              f"{g / 2**30:7.2f} GiB | GQA/hybrid {g / h:5.1f}x, all-MLA/hybrid {m / h:4.1f}x")
    _plot(args.out, rows, big_rows, hybrid, args)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "batch": args.batch, "dtype": args.dtype,
                   "measured": rows, "ling_2_5_1t": big_rows}, f, indent=1)
    print(f"\nwrote {args.out}")


def _plot(path, rows, big_rows, hybrid, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    ctx = [r["context"] for r in rows]
    a.plot(ctx, [r["hybrid_s"] * 1e3 for r in rows], "o-", label=f"hybrid (G={hybrid.layer_group_size})")
    a.plot(ctx, [r["all_mla_s"] * 1e3 for r in rows], "s-", label="all-MLA (G=1)")
    a.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
          title=f"measured on {jax.devices()[0].device_kind}, batch {args.batch}")
    a.legend()
    t = [r[0] for r in big_rows]
    for i, name in enumerate(("hybrid", "all-MLA", f"GQA ({args.gqa_kv_heads} KV heads)")):
        b.plot(t, [r[i + 1] / 2**30 for r in big_rows], "o-", label=name)
    b.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="GiB touched per decode step per sequence",
          title="Ling-2.5-1T cache traffic (computed)")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
