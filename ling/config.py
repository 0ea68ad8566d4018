"""`LingConfig`: the published `config.json` of BailingMoeV2_5ForCausalLM as a frozen dataclass.

Field names and defaults are the reference configuration class's (`configuration_bailing_moe_v2_5.py`), so
`from_hf(to_hf(c)) == c` and a published `config.json` loads without renaming. The one field that is not part of
the published format, `attention_impl`, says which kernels the model calls and is never written by `to_hf`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

MODEL_TYPE = "bailing_hybrid"
ARCHITECTURE = "BailingMoeV2_5ForCausalLM"
ATTENTION_IMPLS = ("auto", "reference", "pallas")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (transformers' `rope_type: yarn`). None-valued fields take transformers' defaults."""

    rope_type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeScaling:
        d = dict(d)
        rope_type = d.pop("rope_type", d.pop("type", None))
        if rope_type not in ("yarn", "default"):
            raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (expected 'yarn' or 'default')")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"rope_scaling has unknown keys {unknown}")
        if rope_type == "yarn" and "factor" not in d:
            raise ValueError("rope_scaling with rope_type 'yarn' needs 'factor'")
        return cls(rope_type=rope_type, **d)

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class LingConfig:
    """Every field the reference model reads, with the reference's defaults."""

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4  # read by the reference config but ignored by both attention kinds
    head_dim: int = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    use_cache: bool = True
    max_window_layers: int = 20
    rope_scaling: RopeScaling | None = None
    pad_token_id: int | None = 156892
    eos_token_id: int | tuple[int, ...] | None = 156892
    bos_token_id: int | None = None
    num_experts: int | None = 256  # None: every layer dense (the reference builds no MoE block)
    num_shared_experts: int | None = 1  # None or 0: no shared expert
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    use_qk_norm: bool = True
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.0
    moe_router_enable_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    layer_group_size: int = 5
    group_norm_size: int = 4
    linear_silu: bool = False  # stored by the reference config, never applied by its modelling code
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    rope_interleave: bool = True
    partial_rotary_factor: float = 0.5
    score_function: str = "sigmoid"
    scoring_func: str = "sigmoid"
    seq_aux: bool = True
    topk_method: str = "noaux_tc"
    router_dtype: str = "fp32"
    # Not part of the published format: which kernels the layers call ("auto": Pallas on TPU/GPU, jnp on CPU).
    attention_impl: str = "auto"

    def __post_init__(self):
        self.validate()

    # ----- derived quantities -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rotary_dim(self) -> int:
        """Rotated dims of a linear-attention head; MLA shares the same RoPE table, so this is also its rope dim."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def is_mla_layer(self, i: int) -> bool:
        """The reference's layer-type rule: the last layer of each group, and every layer of a trailing
        incomplete group, is MLA; MTP layers (i >= num_hidden_layers) are always MLA."""
        g, n = self.layer_group_size, self.num_hidden_layers
        return i >= n or (i + 1) % g == 0 or i >= (n // g) * g

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace

    # ----- validation -----
    def validate(self) -> None:
        errors = []
        if self.attention_impl not in ATTENTION_IMPLS:
            errors.append(f"attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act={self.hidden_act!r}: only 'silu' is implemented by the reference")
        for name in ("score_function", "scoring_func"):
            if getattr(self, name) != "sigmoid":
                errors.append(f"{name}={getattr(self, name)!r}: the reference routes with 'sigmoid' only")
        if not self.rope_interleave:
            errors.append("rope_interleave=False: the reference's non-interleaved MLA branch divides by zero")
        if self.head_dim * self.partial_rotary_factor != self.qk_rope_head_dim:
            errors.append(
                f"head_dim * partial_rotary_factor = {self.head_dim} * {self.partial_rotary_factor} != "
                f"qk_rope_head_dim = {self.qk_rope_head_dim}: MLA shares the linear layers' RoPE table")
        if self.rotary_dim % 2:
            errors.append(f"rotary dim {self.rotary_dim} must be even")
        if self.num_experts is None:
            if self.num_nextn_predict_layers:
                errors.append("num_experts=None with MTP layers: the reference's MTP layers are always MoE")
        elif self.num_experts % self.n_group:
            errors.append(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        elif self.num_experts // self.n_group < 2 and self.n_group > 1:
            errors.append("group-limited routing scores each group by its top-2 experts: need >= 2 experts per group")
        if not 1 <= self.topk_group <= self.n_group:
            errors.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        elif self.num_experts is not None and self.num_experts_per_tok > self.topk_group * (
                self.num_experts // self.n_group):
            errors.append(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group={self.topk_group} "
                f"groups of {self.num_experts // self.n_group}")
        if (self.num_attention_heads * self.head_dim) % self.group_norm_size:
            errors.append(
                f"num_attention_heads*head_dim={self.num_attention_heads * self.head_dim} is not divisible by "
                f"group_norm_size={self.group_norm_size}")
        if self.layer_group_size < 1:
            errors.append(f"layer_group_size={self.layer_group_size} must be >= 1")
        if self.num_hidden_layers < 2:
            errors.append("num_hidden_layers must be >= 2 (the Lightning decay ramp divides by num_hidden_layers-1)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            errors.append(f"first_k_dense_replace={self.first_k_dense_replace} outside [0, num_hidden_layers]")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            errors.append("rope_scaling must be a RopeScaling (use LingConfig.from_hf for a dict)")
        if errors:
            raise ValueError("invalid LingConfig:\n  " + "\n  ".join(errors))

    # ----- published format -----
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides) -> LingConfig:
        """From a published `config.json` (a file, a checkpoint directory, or its parsed dict).

        Keys the reference does not read (generic `PretrainedConfig` fields) are ignored; `overrides` replace
        fields after parsing (e.g. `attention_impl="reference"`).
        """
        if isinstance(path_or_dict, dict):
            d, where = dict(path_or_dict), "config dict"
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path) as f:
                    d = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"no config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        model_type = d.get("model_type")
        if model_type not in (None, MODEL_TYPE):
            raise ValueError(f"{where}: model_type={model_type!r}, expected {MODEL_TYPE!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and k != "attention_impl"}
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = d.get("hidden_size", cls.hidden_size) // d.get("num_attention_heads",
                                                                                 cls.num_attention_heads)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if kwargs.get("rope_scaling") is not None:
            rs = kwargs["rope_scaling"]
            kwargs["rope_scaling"] = None if rs.get("rope_type", rs.get("type")) == "default" else RopeScaling.from_hf(rs)
        if "qk_head_dim" in d and d["qk_head_dim"] != d.get("qk_nope_head_dim", 128) + d.get("qk_rope_head_dim", 64):
            raise ValueError(f"{where}: qk_head_dim={d['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim")
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The published `config.json` dict (model_type, architectures and every reference field)."""
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name == "attention_impl":
                continue
            v = getattr(self, f.name)
            if isinstance(v, RopeScaling):
                v = v.to_hf()
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        d["qk_head_dim"] = self.qk_head_dim
        return d

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hf(), f, indent=2, sort_keys=True)

    def replace(self, **changes) -> LingConfig:
        return dataclasses.replace(self, **changes)


def load_yaml_config(path: str | os.PathLike, **overrides) -> LingConfig:
    """A preset from `configs/*.yaml` (published config.json keys, YAML syntax)."""
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of config.json keys")
    return LingConfig.from_hf(d.get("model", d), **overrides)


def slopes_for_heads(n: int) -> list[float]:
    """ALiBi slopes (the Lightning decay bases): s^(i+1) with s = 2^(-8/n) for n a power of two; otherwise the
    power-of-two prefix plus every other slope of twice that count."""
    def power_of_two(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_two(p) + slopes_for_heads(2 * p)[0::2][: n - p]
