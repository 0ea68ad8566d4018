"""Compile time against depth: the scanned stack keeps it flat.

Prints lower+compile seconds (median of --repeats) for models of the same width with 8 and 64 layers, and the
64/8 ratio (target: <= 1.5), for the forward pass (inference) and value_and_grad of the forward (training) under
each remat policy, with and without a dense first layer (a group holding a dense layer is the head, applied as
scanned same-kind runs). `python benchmarks/compile_time.py [--layers 8 16 64] [--remat none full dots]`.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import ling


def compile_seconds(layers: int, hidden: int, seq: int, dense_layers: int, remat: str, train: bool) -> float:
    c = ling.LingConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, head_dim=hidden // 4, layer_group_size=8, group_norm_size=4,
                        num_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
                        moe_intermediate_size=hidden // 2, first_k_dense_replace=dense_layers, kv_lora_rank=hidden // 2,
                        q_lora_rank=hidden // 2, qk_nope_head_dim=hidden // 4, qk_rope_head_dim=hidden // 8,
                        v_head_dim=hidden // 4, attention_impl="reference")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ling.LingModel(c, rngs=nnx.Rngs(0), remat=remat)))
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(s, x):
        return nnx.merge(graphdef, s)(x).mean()

    fn = jax.value_and_grad(loss) if train else loss
    t0 = time.perf_counter()
    jax.jit(fn).trace(state, ids).lower().compile()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 64])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-layers", type=int, nargs="+", default=[0, 1], help="first_k_dense_replace values")
    p.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "dots"])
    a = p.parse_args()
    print(f"{'pass':8} {'remat':5} {'dense':5} " + " ".join(f"{n:>6}L" for n in a.layers)
          + f"  ratio {a.layers[-1]}/{a.layers[0]} (target <= 1.5)")
    for train in (False, True):
        for remat in (["none"] if not train else a.remat):
            for dense in a.dense_layers:
                times = [statistics.median(compile_seconds(n, a.hidden, a.seq, dense, remat, train)
                                           for _ in range(a.repeats)) for n in a.layers]
                print(f"{'train' if train else 'forward':8} {remat:5} {dense:5} " + " ".join(f"{s:6.2f}s" for s in times)
                      + f"  {times[-1] / times[0]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
