"""Which collectives each parallelism puts in one decoder block: counts of all-gather (AG), reduce-scatter (RS),
all-reduce (AR), all-to-all (A2A) and collective-permute (CP) ops in the compiled, partitioned HLO of one
Lightning+MoE block and one MLA+MoE block, forward and forward+backward, on 8 CPU devices.

`python benchmarks/collectives.py [--tokens 64]`. Counts are ops in the HLO (XLA combines small collectives), not
per-tensor counts. With a context axis the tokens are in zig-zag order, as the model's full forward runs them.
"""
import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import sharding  # noqa: E402
from ling.block import DecoderBlock  # noqa: E402
from ling.config import LingConfig  # noqa: E402
from ling.layers.context import ForwardContext  # noqa: E402
from ling.layers.rope import rope_table  # noqa: E402
from sharding import context_parallel  # noqa: E402

MESHES = {"fsdp8": {"fsdp": 8}, "data2-expert4": {"data": 2, "expert": 4},
          "fsdp2-tensor2-expert2": {"fsdp": 2, "tensor": 2, "expert": 2}, "context8": {"context": 8},
          "data2-context4": {"data": 2, "context": 4}}
OPS = {"AG": "all-gather", "RS": "reduce-scatter", "AR": "all-reduce", "A2A": "all-to-all", "CP": "collective-permute"}


def counts(hlo: str) -> str:
    found = {k: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for k, op in OPS.items()}
    return ", ".join(f"{k} {n}" for k, n in found.items() if n)


def block_hlo(config: LingConfig, mla: bool, mesh, tokens: int, train: bool) -> str:
    block = DecoderBlock(config, mla=mla, moe=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        sharding.shard_model(block, mesh)
        graphdef, state = nnx.split(block)
        ids = jnp.zeros((8, tokens), jnp.int32)
        zigzag = context_parallel.zigzag_shards(ids.shape) > 0

        def fwd(state, x_btd, pos_bt):
            cos, sin = rope_table(config, pos_bt)
            ctx = ForwardContext(cos=cos, sin=sin, segment_ids=jnp.zeros_like(pos_bt), zigzag=zigzag)
            return nnx.merge(graphdef, state)(x_btd, ctx, 3, None)[0].sum()

        fn = jax.grad(fwd) if train else fwd
        x = jax.device_put(jnp.ones((8, tokens, config.hidden_size)), sharding.batch_sharding(mesh))
        pos = jax.device_put(jnp.broadcast_to(jnp.arange(tokens), (8, tokens)), sharding.batch_sharding(mesh))
        return jax.jit(fn).lower(state, x, pos).compile().as_text()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    c = LingConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                   head_dim=16, layer_group_size=4, group_norm_size=2, num_experts=16, num_experts_per_tok=2, n_group=4,
                   topk_group=2, moe_intermediate_size=16, first_k_dense_replace=0, kv_lora_rank=32, q_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, attention_impl="reference")
    print("| mesh | Lightning+MoE fwd / fwd+bwd | MLA+MoE fwd / fwd+bwd |\n|---|---|---|")
    for name, axes in MESHES.items():
        mesh = sharding.make_mesh(axes)
        cells = [" / ".join(counts(block_hlo(c, mla, mesh, a.tokens, train)) for train in (False, True))
                 for mla in (False, True)]
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
