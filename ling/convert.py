"""Convert between train.py's orbax checkpoints and the published safetensors format.

    python -m ling.convert to-safetensors --config configs/quickstart.yaml --checkpoints RUN/checkpoints --out DIR
    python -m ling.convert to-orbax --config configs/quickstart.yaml --checkpoint DIR --out RUN/checkpoints

The training config supplies the model and optimizer shapes of the train state. to-safetensors takes the newest
complete step and copies the run's tokenizer.json beside the weights; to-orbax writes step 0 with a fresh optimizer state, which train.py then resumes from.
"""
import argparse
import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
from flax import nnx


def _abstract_state(cfg):
    from ling.model import LingModel
    from trainer.optimizer import make_optimizer
    from trainer.step import init_train_state, split_model

    t = cfg.train
    tx = make_optimizer(dataclasses.replace(cfg.optimizer, grad_accum_steps=1))
    model = nnx.eval_shape(lambda: LingModel(cfg.model, dtype=jnp.dtype(t.compute_dtype),
                                             param_dtype=jnp.dtype(t.param_dtype), rngs=nnx.Rngs(0)))
    state = jax.eval_shape(lambda: init_train_state(LingModel(cfg.model, param_dtype=jnp.dtype(t.param_dtype),
                                                              rngs=nnx.Rngs(0)), tx, 0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), state)
    return split_model(model)[0], tx, state


def to_safetensors(cfg, checkpoints: str, out: str) -> int:
    """Write the params of the newest complete step as a published checkpoint; returns the step."""
    from ling.checkpoint import save_pretrained
    from trainer.checkpointing import TrainCheckpointer

    graphdef, _, abstract = _abstract_state(cfg)
    with TrainCheckpointer(checkpoints, save_interval_steps=1, max_to_keep=10**6, async_save=False) as ckpt:
        restored = ckpt.restore_latest(abstract)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints}")
    step, state, _ = restored
    save_pretrained(nnx.merge(graphdef, state["params"], state["rest"]), out)
    tokenizer = cfg.data.get("tokenizer") or (  # the quickstart trains its tokenizer into RUN/data
        os.path.join(os.path.dirname(os.path.abspath(checkpoints)), "data", "tokenizer.json")
        if cfg.data.get("quickstart") else None)
    if tokenizer and os.path.exists(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))  # so serve.py can take text prompts
    return step


def to_orbax(cfg, checkpoint: str, out: str) -> None:
    """A published checkpoint as train.py's step-0 train state (fresh optimizer)."""
    from ling.checkpoint import from_pretrained
    from trainer.checkpointing import TrainCheckpointer
    from trainer.step import init_train_state

    _, tx, _ = _abstract_state(cfg)
    model = from_pretrained(checkpoint, dtype=jnp.dtype(cfg.train.param_dtype))
    if model.config.replace(attention_impl="auto") != cfg.model.replace(attention_impl="auto"):
        raise ValueError(f"{checkpoint}/config.json differs from the training config's model")
    state = init_train_state(model, tx, cfg.train.seed)
    with TrainCheckpointer(out, save_interval_steps=1, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save_now(0, state, {"data": None, "converted_from": os.path.abspath(checkpoint)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("to-safetensors")
    a.add_argument("--config", required=True)
    a.add_argument("--checkpoints", required=True, help="RUN/checkpoints of train.py")
    a.add_argument("--out", required=True)
    b = sub.add_parser("to-orbax")
    b.add_argument("--config", required=True)
    b.add_argument("--checkpoint", required=True, help="published checkpoint directory")
    b.add_argument("--out", required=True, help="the new RUN/checkpoints directory")
    args = p.parse_args(argv)
    from trainer.config import load_train_config

    cfg = load_train_config(args.config)
    if args.direction == "to-safetensors":
        step = to_safetensors(cfg, args.checkpoints, args.out)
        print(f"wrote step {step} to {args.out}")
    else:
        to_orbax(cfg, args.checkpoint, args.out)
        print(f"wrote {args.out} (step 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
