"""TrainConfig: everything train.py needs, parsed once from YAML plus `key=value` overrides.

YAML layout (see configs/quickstart.yaml):
    model: {config.json keys} | "configs/<preset>.yaml"      # the LingConfig
    model_overrides: {config.json keys}                      # e.g. rope_scaling for a YaRN stage
    data: {DataConfig fields; quickstart: true writes the embedded corpus into the workdir}
    optimizer: {OptimizerConfig fields}
    train: {TrainLoopConfig fields}
    mesh: {data/fsdp/expert/tensor/context: size}            # -1 fills the remaining devices
Overrides are dotted paths, e.g. `train.steps=20 optimizer.peak_lr=1e-3 model_overrides.rope_theta=1e6`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from ling.config import LingConfig, load_yaml_config
from trainer.optimizer import OptimizerConfig

SECTIONS = ("model", "model_overrides", "data", "optimizer", "train", "mesh")


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 100
    log_every: int = 10
    save_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    z_loss_weight: float = 0.0
    expert_bias_rate: float = 1e-3  # DeepSeek-V3's aux-loss-free update speed; 0 disables
    init_from: str | None = None  # published checkpoint dir (e.g. the pre-YaRN model for continued pretraining)
    sample_prompt: str | None = None  # decoded after training when a tokenizer exists
    sample_tokens: int = 32
    sample_temperature: float = 0.0  # 0 = greedy
    sample_top_k: int = 0
    async_checkpointing: bool = True
    # XLA executables kept here across runs (JAX's persistent compilation cache), so a restart after preemption
    # loads the compiled step instead of recompiling; '~' is expanded. None: off.
    compilation_cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: LingConfig
    data: dict  # DataConfig kwargs (paths resolved by train.py: the quickstart corpus lives in the workdir)
    optimizer: OptimizerConfig
    train: TrainLoopConfig
    mesh: dict


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if keys[0] not in SECTIONS:
        raise ValueError(f"override {dotted!r}: the first key must be one of {SECTIONS}")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {dotted!r}: {k} is not a mapping")
    d[keys[-1]] = value


def _build(cls, d: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config section '{section}': unknown keys {unknown} (known: {sorted(names)})")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config section '{section}': {e}") from None


def load_train_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Parse a training YAML and `key=value` overrides into a TrainConfig; errors name the file and key."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"training config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict) or set(raw) - set(SECTIONS):
        raise ValueError(f"{path}: top-level keys must be among {SECTIONS}; got {sorted(raw) if isinstance(raw, dict) else raw}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key, yaml.safe_load(value))
    model = raw.get("model")
    extra = raw.get("model_overrides") or {}
    base = os.path.dirname(os.path.abspath(path))
    if isinstance(model, str):
        preset = model if os.path.isabs(model) or os.path.exists(model) else os.path.join(base, os.path.basename(model))
        model_cfg = load_yaml_config(preset)
        published = {k: v for k, v in model_cfg.to_hf().items() if k != "qk_head_dim"}  # derived; may change
        model_cfg = LingConfig.from_hf({**published, **extra}) if extra else model_cfg
    elif isinstance(model, dict):
        model_cfg = LingConfig.from_hf({**model, **extra})
    else:
        raise ValueError(f"{path}: 'model' must be a preset path or a mapping of config.json keys")
    return TrainConfig(model=model_cfg, data=dict(raw.get("data") or {}),
                       optimizer=_build(OptimizerConfig, raw.get("optimizer") or {}, "optimizer"),
                       train=_build(TrainLoopConfig, raw.get("train") or {}, "train"),
                       mesh=dict(raw.get("mesh") or {}))
