"""Compile time against depth: the scanned stack keeps it flat.

Prints lower+compile seconds (median of --repeats) for models of the same width with 8 and 64 layers, and the
64/8 ratio (target: <= 1.5), for the forward pass (inference), value_and_grad of the forward ("grad": the model's
own backward) and the whole jitted training step ("step": trainer.step.train_step, i.e. loss, backward, AdamW and
the expert-bias update, what a training run compiles) under each remat policy, with and without a dense first layer
(a group holding a dense layer is the head, applied as scanned same-kind runs).
`python benchmarks/compile_time.py [--layers 8 16 64] [--remat none full dots] [--passes forward grad step]
[--group-size 8] [--dense-layers 0 1]`.
"""
import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import ling
from trainer.optimizer import OptimizerConfig, make_optimizer
from trainer.step import StepConfig, init_train_state, split_model, train_step


def sized_config(layers: int, hidden: int, group: int, dense_layers: int, **overrides) -> ling.LingConfig:
    """A small Ling 2.5 whose every width follows `hidden` (4 heads, 16 experts top-2 in 4 groups), for benchmarks
    that vary depth or policy at a fixed width."""
    return ling.LingConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, head_dim=hidden // 4, layer_group_size=group, group_norm_size=4,
                           num_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
                           moe_intermediate_size=hidden // 2, first_k_dense_replace=dense_layers,
                           kv_lora_rank=hidden // 2, q_lora_rank=hidden // 2, qk_nope_head_dim=hidden // 4,
                           qk_rope_head_dim=hidden // 8, v_head_dim=hidden // 4, **overrides)


def compile_seconds(layers: int, hidden: int, seq: int, group: int, dense_layers: int, remat: str, kind: str) -> float:
    c = sized_config(layers, hidden, group, dense_layers, attention_impl="reference")
    make = lambda: ling.LingModel(c, rngs=nnx.Rngs(0), remat=remat)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    if kind == "step":
        tx = make_optimizer(OptimizerConfig(warmup_steps=1, total_steps=100))
        state = jax.eval_shape(lambda: init_train_state(make(), tx, 0))
        step_cfg = StepConfig(mtp_loss_scale=0.0, z_loss_weight=0.0, expert_bias_rate=1e-3, grad_accum_steps=1)
        batch = {k: ids for k in ("input_ids", "targets", "segment_ids", "positions")}
        batch["loss_mask"] = jax.ShapeDtypeStruct(ids.shape, jnp.float32)
        traced = train_step.trace(split_model(nnx.eval_shape(make))[0], tx, step_cfg, state, batch)
    else:
        graphdef, state = nnx.split(nnx.eval_shape(make))

        def loss(s, x):
            return nnx.merge(graphdef, s)(x).mean()

        traced = jax.jit(jax.value_and_grad(loss) if kind == "grad" else loss).trace(state, ids)
    t0 = time.perf_counter()
    traced.lower().compile()
    seconds = time.perf_counter() - t0
    # Free the executables: XLA:CPU maps each compiled kernel separately, and dozens of kept programs exhaust the
    # process's memory-map limit.
    jax.clear_caches()
    gc.collect()
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 64])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--group-size", type=int, default=8, help="layer_group_size (tiny-a and configs/tiny.yaml: 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-layers", type=int, nargs="+", default=[0, 1], help="first_k_dense_replace values")
    p.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "dots"])
    p.add_argument("--passes", nargs="+", default=["forward", "grad", "step"], choices=["forward", "grad", "step"])
    a = p.parse_args()
    print(f"{'pass':8} {'remat':5} {'dense':5} " + " ".join(f"{n:>6}L" for n in a.layers)
          + f"  ratio {a.layers[-1]}/{a.layers[0]} (target <= 1.5)")
    for kind in a.passes:
        for remat in (["none"] if kind == "forward" else a.remat):
            for dense in a.dense_layers:
                times = [statistics.median(compile_seconds(n, a.hidden, a.seq, a.group_size, dense, remat, kind)
                                           for _ in range(a.repeats)) for n in a.layers]
                print(f"{kind:8} {remat:5} {dense:5} " + " ".join(f"{s:6.2f}s" for s in times)
                      + f"  {times[-1] / times[0]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
