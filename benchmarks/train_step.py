"""Training-step throughput: tokens/s and MFU of the jitted step for the tiny and a mid-size config on the backend
present (median step time after compile), then the 1T step's per-device memory from the capacity planner.

`python benchmarks/train_step.py [--configs tiny mid] [--steps 5] [--seq 512] [--batch 8]`
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ling
from benchmarks.peaks import detect_chip
from ling.config import load_yaml_config
from trainer.flops import flops_per_token
from trainer.optimizer import OptimizerConfig, make_optimizer
from trainer.step import StepConfig, init_train_state, split_model, train_step

MID = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=8, head_dim=128,
           layer_group_size=8, group_norm_size=4, num_experts=64, num_experts_per_tok=4, n_group=8, topk_group=4,
           moe_intermediate_size=512, kv_lora_rank=256, q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=64,
           v_head_dim=128, vocab_size=32768, num_nextn_predict_layers=0)


def config(name: str) -> ling.LingConfig:
    tiny = load_yaml_config("configs/tiny.yaml")
    return tiny if name == "tiny" else tiny.replace(**MID)


def measure(cfg: ling.LingConfig, seq: int, batch: int, steps: int, dtype) -> dict:
    model = ling.LingModel(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0), remat="full")
    tx = make_optimizer(OptimizerConfig(warmup_steps=1, total_steps=100))
    graphdef = split_model(model)[0]
    state = init_train_state(model, tx, 0)
    step_cfg = StepConfig(mtp_loss_scale=0.0, z_loss_weight=0.0, expert_bias_rate=1e-3, grad_accum_steps=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    b = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "loss_mask": jnp.ones((batch, seq), jnp.float32),
         "segment_ids": jnp.ones((batch, seq), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq))}
    t0 = time.perf_counter()
    state, m = train_step(graphdef, tx, step_cfg, state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = train_step(graphdef, tx, step_cfg, state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tps = batch * seq / sec
    chip = detect_chip()
    mfu = tps * flops_per_token(cfg, seq) / (chip.bf16_flops * jax.device_count()) if chip else None
    return {"compile_s": compile_s, "step_s": sec, "tokens_per_s": tps, "mfu": mfu}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    # XLA:CPU expands ragged_dot to a dense [rows, experts * hidden] operand, so the 64-expert mid config needs an
    # accelerator (or tens of GB of host memory).
    p.add_argument("--configs", nargs="+", default=["tiny"] if jax.default_backend() == "cpu" else ["tiny", "mid"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), compute {jnp.dtype(dtype).name}")
    for name in a.configs:
        r = measure(config(name), a.seq, a.batch, a.steps, dtype)
        mfu = "n/a (no peak for this chip)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{name:5s} compile {r['compile_s']:6.1f} s  step {1e3 * r['step_s']:8.1f} ms  "
              f"{r['tokens_per_s']:10.0f} tokens/s  MFU {mfu}")
    try:
        from sharding.plan import main as plan_main
    except ImportError:
        print("1T memory plan: sharding.plan not available")
        return
    print("1T step on an abstract v5p-1024 mesh (capacity planner):")
    plan_main(["--config", "configs/ling-2.5-1t.yaml", "--topology", "v5p-1024"])


if __name__ == "__main__":
    main()
