"""Where each published tensor lives in the model's (stacked) parameter tree.

A model leaf is a grid of published tensors: its leading axes index layers of the scanned stack and, for routed
experts, the expert; the remaining axes are one published tensor in this codebase's layout. Published linear
weights are [out, in]; ours are [in..., out...] so that einsums read `'btd,dhk->bthk'`.
"""
import dataclasses

import numpy as np

from ling.config import LingConfig
from ling.stack import StackPlan

_EXPERT_MATS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LeafSource:
    """names: published tensor names, shaped like the leaf's leading grid axes. layout: "same" (identical shape),
    "flat" (published 1-D, reshaped) or "matrix" (published [out, in]; ours = t.T reshaped, n_in input axes)."""

    names: np.ndarray
    layout: str
    n_in: int = 1

    def published_shape(self, inner: tuple[int, ...]) -> tuple[int, ...]:
        if self.layout == "same":
            return inner
        if self.layout == "flat":
            return (int(np.prod(inner)),)
        return (int(np.prod(inner[self.n_in:])), int(np.prod(inner[:self.n_in])))

    def to_ours(self, t: np.ndarray, inner: tuple[int, ...]) -> np.ndarray:
        return t.T.reshape(inner) if self.layout == "matrix" else t.reshape(inner)

    def to_published(self, a: np.ndarray) -> np.ndarray:
        inner = a.shape
        if self.layout == "matrix":
            return np.ascontiguousarray(a.reshape(int(np.prod(inner[:self.n_in])), -1).T)
        return a.reshape(self.published_shape(inner))


def _suffix(rel: tuple[str, ...], moe: bool) -> tuple[str, bool]:
    """Published name suffix of a block-relative path, and whether it is a per-expert tensor."""
    if rel == ("mlp", "expert_bias"):
        return "mlp.gate.expert_bias", False
    if moe and len(rel) == 2 and rel[0] == "mlp" and rel[1] in _EXPERT_MATS:
        return f"mlp.experts.{{e}}.{rel[1]}.weight", True
    *mods, leaf = rel
    if leaf == "weight":
        return ".".join(rel), False
    if leaf.endswith("_bias"):
        return ".".join([*mods, leaf[: -len("_bias")], "bias"]), False
    return ".".join([*mods, leaf, "weight"]), False


def _layout(rel: tuple[str, ...], inner_ndim: int) -> tuple[str, int]:
    if rel[-1] == "weight" or rel[-1].endswith("_bias") or rel[-1] == "expert_bias":
        return "flat", 1
    return "matrix", (2 if rel[-1] == "dense" else 1)


def leaf_source(config: LingConfig, path: tuple, shape: tuple[int, ...]) -> LeafSource:
    """The published tensors behind the model leaf at `path` (an nnx state path) of `shape`."""
    plan = StackPlan.from_config(config)
    g = plan.group_size
    top = path[0]
    if top == "word_embeddings":
        return LeafSource(np.array("model.word_embeddings.weight"), "same")
    if top == "norm":
        return LeafSource(np.array("model.norm.weight"), "flat")
    if top == "lm_head":
        return LeafSource(np.array("lm_head.weight"), "matrix")
    if top in ("head", "tail"):
        layers = np.array((plan.head if top == "head" else plan.tail)[path[1]])
        rel = path[2:]
    elif top == "groups":
        kind, rel = path[1], path[2:]
        gi = np.arange(plan.n_groups)
        layers = (plan.group_start + gi[:, None] * g + np.arange(g - 1)[None] if kind == "lightning"
                  else plan.group_start + gi * g + g - 1)
    elif top == "mtp":
        layers = np.array(config.num_hidden_layers + path[1])
        rel = path[2:]
        if rel[0] == "block":
            rel = rel[1:]
        elif rel == ("eh_proj",):
            return LeafSource(np.array(f"model.layers.{int(layers)}.eh_proj.weight"), "matrix")
    else:
        raise ValueError(f"no published tensor for model path {path}")
    rel = tuple(str(p) for p in rel)
    moe = config.is_moe_layer(int(np.ravel(layers)[0]))
    suffix, per_expert = _suffix(rel, moe)
    layout, n_in = _layout(rel, len(shape) - layers.ndim)
    fmt = np.vectorize(lambda i: f"model.layers.{i}.{suffix}", otypes=[object])
    names = fmt(layers)
    if per_expert:
        e = np.arange(config.num_experts)
        names = np.vectorize(lambda n, k: n.replace("{e}", str(k)), otypes=[object])(names[..., None], e)
    return LeafSource(names, layout, n_in)
