"""AdamW with linear warmup + cosine decay, global-norm clipping and a by-name weight-decay mask."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

# A leaf is exempt from weight decay when any key on its path contains one of these (lower-cased). Stacked or
# scanned layers give norm scales 2-D or 3-D shapes, so rank cannot tell a norm from a matmul weight; names can.
NO_DECAY_SUBSTRINGS = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters. Steps count optimizer updates (after gradient accumulation)."""

    peak_lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 10_000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        errors = []
        if not self.peak_lr > 0:
            errors.append(f"peak_lr={self.peak_lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 <= self.warmup_steps <= self.total_steps:
            errors.append(f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]")
        if self.total_steps < 1:
            errors.append(f"total_steps={self.total_steps} must be >= 1")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not self.eps > 0:
            errors.append(f"eps={self.eps} must be > 0")
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay} must be >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            errors.append(f"clip_norm={self.clip_norm} must be > 0 or None (no clipping)")
        if self.grad_accum_steps < 1:
            errors.append(f"grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if errors:
            raise ValueError("invalid OptimizerConfig:\n  " + "\n  ".join(errors))


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """lr(step): 0 -> peak_lr linearly over warmup_steps, then a cosine from peak_lr down to peak_lr * min_lr_ratio
    at total_steps, constant after. With warmup_steps == 0, lr(0) == peak_lr."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.peak_lr * cfg.min_lr_ratio,
    )


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return ""  # sequence / flattened indices carry no name


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools shaped like `params`: False for leaves whose path names a norm or a bias
    (`norm`, `layernorm`, `g_norm`, `bias`, `expert_bias`, ...), True for everything else."""
    def decays(path, _leaf) -> bool:
        names = [_key_name(k).lower() for k in path]
        return not any(s in n for n in names for s in NO_DECAY_SUBSTRINGS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule, weight decay on `weight_decay_mask` leaves only).

    The mask is computed from the tree optax is handed at `init`/`update`, not from a tree given here, because
    the same parameters arrive in different containers: nnx.Optimizer passes an nnx.State of raw arrays, a
    functional loop a pure dict. With grad_accum_steps > 1 the chain is wrapped in `optax.MultiSteps`: `update`
    is called once per micro-batch, averages the gradients and applies the chain (clipping included) every
    grad_accum_steps calls, returning zero updates in between; the schedule and Adam's count advance once per
    applied update.
    """
    tx = optax.adamw(
        learning_rate=learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx
