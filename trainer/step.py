"""The training step: next-token + MTP (+ optional z-) loss, gradient accumulation, AdamW update and the
aux-loss-free expert-bias update, as one jitted function over a functional train state."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ling.model import LingModel
from sharding.rules import constrain_state


@dataclasses.dataclass(frozen=True)
class StepConfig:
    mtp_loss_scale: float
    z_loss_weight: float
    expert_bias_rate: float
    grad_accum_steps: int


def split_model(model: LingModel):
    """(graphdef, params, rest): trainable Params and everything else (the expert-bias buffers)."""
    return nnx.split(model, nnx.Param, ...)


def init_train_state(model: LingModel, tx: optax.GradientTransformation, seed: int) -> dict:
    _, params, rest = split_model(model)
    return {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def _shift(x_bt, k, fill):
    return jnp.concatenate([x_bt[:, k:], jnp.full((x_bt.shape[0], k), fill, x_bt.dtype)], axis=1)


def token_losses(logits_btv, targets_bt, mask_bt):
    """(sum of masked cross-entropy, sum of masked logsumexp², number of masked tokens)."""
    lse = jax.nn.logsumexp(logits_btv, axis=-1)
    picked = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * mask_bt), jnp.sum(lse ** 2 * mask_bt), jnp.sum(mask_bt)


def loss_sums(model: LingModel, batch: dict, cfg: StepConfig):
    """Summed (not averaged) losses of one micro-batch, so accumulation over micro-batches equals the full batch.

    MTP layer j predicts the token j+2 ahead: its target is `targets` shifted by j+1 and it counts only where the
    whole chain stays inside one document (the product of the shifted loss masks). Every term is divided by the
    batch's next-token count (not each head's own count), so losses add over documents and micro-batches.
    """
    mtp_on = cfg.mtp_loss_scale > 0 and len(model.mtp) > 0
    out = model.forward(batch["input_ids"], batch["positions"], batch["segment_ids"], return_mtp=mtp_on)
    ce, z, n = token_losses(out.logits, batch["targets"], batch["loss_mask"])
    total = ce + cfg.z_loss_weight * z
    sums = {"ce": ce, "tokens": n}
    if mtp_on:
        mask = batch["loss_mask"]
        for j, logits in enumerate(out.mtp_logits):
            mask = mask * _shift(batch["loss_mask"], j + 1, 0.0)
            ce_j, _, n_j = token_losses(logits, _shift(batch["targets"], j + 1, 0), mask)
            total = total + cfg.mtp_loss_scale * ce_j
            sums[f"mtp{j}_ce"], sums[f"mtp{j}_tokens"] = ce_j, n_j
    return total, (sums, out.expert_load)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step(graphdef, tx, cfg: StepConfig, state: dict, batch: dict):
    """One optimizer step over `batch` ([global B, T] arrays, split into cfg.grad_accum_steps micro-batches)."""
    k = cfg.grad_accum_steps
    micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def micro_grads(params, mb):
        def f(p):
            loss, aux = loss_sums(nnx.merge(graphdef, p, state["rest"]), mb, cfg)
            return loss / total_tokens, aux
        return jax.value_and_grad(f, has_aux=True)(params)

    def body(acc, mb):
        (loss, (sums, load)), grads = micro_grads(state["params"], mb)
        return jax.tree.map(jnp.add, acc, (loss, sums, load, grads)), None

    first = jax.tree.map(lambda a: a[0], micro)
    shapes = jax.eval_shape(micro_grads, state["params"], first)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1][0], shapes[0][1][1],
                                                                   shapes[1]))
    (loss, sums, load, grads), _ = jax.lax.scan(body, zero, micro)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    rest = state["rest"]
    if cfg.expert_bias_rate and load is not None:
        model = nnx.merge(graphdef, params, rest)
        model.update_expert_bias(load, cfg.expert_bias_rate)
        _, _, rest = split_model(model)
    metrics = {"loss": loss, "ce": sums["ce"] / total_tokens, "grad_norm": optax.tree.norm(grads),
               "tokens": sums["tokens"]}
    for key in sums:
        if key.startswith("mtp") and key.endswith("_ce"):
            metrics[key] = sums[key] / jnp.maximum(sums[key.replace("_ce", "_tokens")], 1.0)
    if load is not None:
        frac = load / jnp.maximum(load.sum(-1, keepdims=True), 1)
        metrics["expert_load_imbalance"] = jnp.mean(frac.max(-1) * load.shape[-1])  # 1.0 = perfectly balanced
    new_state = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
    return constrain_state(new_state), metrics
