"""One table from logical axis names to mesh axes, and everything derived from it.

Parameters carry logical names in their `logical_axes` metadata (ling/layers/params.py); activations are named
where they are constrained (block boundaries) or enter a shard_map island. A name maps to a mesh axis, a tuple of
mesh axes (sharded over their product) or None (replicated). When a dimension is not divisible by its mesh axes,
the trailing axes that do not divide it are dropped (replicated) rather than padded, and a mesh axis is used at most
once per array, so every spec is valid for every shape. Leading axes beyond the named ones (the stacked layer axes
of scanned groups) are never sharded.
"""
import contextlib
import contextvars
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding.mesh import MESH_AXES, active_mesh

Rules = Mapping[str, "str | tuple[str, ...] | None"]

DEFAULT_RULES: dict = {
    # parameters. The hidden dim is the FSDP dim, sharded over every axis that splits the batch except data
    # (pure replicas): parameters without an expert or head dim are then not replicated across those axes.
    "embed": ("fsdp", "context", "expert"),
    "vocab": "tensor",
    "heads": "tensor",
    "heads_merged": "tensor",  # the Lightning output norm over heads * head_dim
    "head_dim": None,
    "q_latent": ("fsdp", "context", "expert"),  # only where "embed" is not on the same tensor (q_b_proj, kv_b_proj)
    "kv_latent": ("fsdp", "context", "expert"),
    "mlp": "tensor",
    "exp": "expert",
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": "context",
    # The residual stream's hidden dim between blocks: split over tensor (sequence-parallel style), so the layer
    # inputs kept for the backward pass are not replicated across tensor shards; the tensor all-reduce becomes a
    # reduce-scatter + all-gather of the same volume.
    "act_embed": "tensor",
}

_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("ling_sharding_rules", default=None)


def make_rules(overrides: Rules | None = None) -> dict:
    """DEFAULT_RULES with `overrides` (e.g. from a config file: {"embed": None, "batch": ["data", "fsdp"]})."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {axes!r}: {axis!r} is not a mesh axis {list(MESH_AXES)}")
        rules[name] = axes
    return rules


@contextlib.contextmanager
def use_rules(rules: Rules):
    """Make `rules` the table the model's sharding constraints and islands use while tracing in this context."""
    token = _ACTIVE_RULES.set(make_rules(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def current_rules() -> dict:
    return _ACTIVE_RULES.get() or DEFAULT_RULES


def logical_to_spec(logical_axes, shape, mesh, rules: Rules | None = None) -> P:
    """PartitionSpec of an array of `shape` whose trailing dims are named `logical_axes`.

    Raises ValueError for a name missing from the rules (a typo would otherwise silently replicate).
    """
    rules = current_rules() if rules is None else rules
    if len(shape) < len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} has fewer dims than logical axes {tuple(logical_axes)}")
    used, spec = set(), [None] * (len(shape) - len(logical_axes))
    for name, size in zip(logical_axes, shape[len(shape) - len(logical_axes):]):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known names: {sorted(rules)}")
        axes = rules[name]
        kept, prod = [], 1
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            n = mesh.shape[axis]
            if axis in used or n == 1:
                continue
            if size % (prod * n):
                break
            kept.append(axis)
            prod *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def placement_spec(spec: P) -> P:
    """`spec` without trailing Nones: the form XLA gives jit outputs. Arrays placed with it compare equal to a
    step's outputs, so a step fed its own outputs (or a restored state) reuses the program compiled for the first
    call instead of compiling a second one."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def mesh_axes(name: str, mesh, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes of size > 1 that logical `name` maps to (regardless of any array's shape)."""
    rules = current_rules() if rules is None else rules
    axes = rules[name]
    return tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if mesh.shape[a] > 1)


def logical_axes_of(var) -> tuple[str | None, ...] | None:
    """The logical axis names an nnx Variable carries (ling/layers/params.py), or None."""
    return var.get_metadata().get("logical_axes")


def _variable_spec(var, mesh, rules) -> P:
    names = logical_axes_of(var)
    if names is None:
        return P()
    return placement_spec(logical_to_spec(names, var.shape, mesh, rules))


def param_specs(state, mesh, rules: Rules | None = None):
    """The tree of `state` (an nnx.State, abstract or concrete) with each Variable's value replaced by its
    PartitionSpec."""
    rules = current_rules() if rules is None else make_rules(rules)
    return jax.tree.map(lambda v: v.replace(_variable_spec(v, mesh, rules)) if isinstance(v, nnx.Variable) else P(),
                        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh, rules: Rules | None = None):
    """The tree of `state` with each Variable's value replaced by its NamedSharding on `mesh` (usable as
    jit out_shardings or device_put target for that state)."""
    return jax.tree.map(lambda p: NamedSharding(mesh, p), param_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding of [B, T] token batches (and of [B, T, ...] by prefix): batch over its axes, length over its."""
    rules = current_rules() if rules is None else make_rules(rules)
    spec = [mesh_axes(name, mesh, rules) for name in ("batch", "length")]
    return NamedSharding(mesh, placement_spec(P(*(None if not a else a[0] if len(a) == 1 else a for a in spec))))


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """with_sharding_constraint to the rules' spec for `logical_axes` under the active mesh; identity without one."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def constrain_state(tree):
    """`tree` (parameters, optimizer state, step counters) constrained to where param_shardings places it: each
    nnx Variable by its logical axes, other arrays replicated; identity without an active mesh. A step that returns
    its state so hands the next step the layout it was compiled for (XLA may otherwise pick another, e.g. split an
    updated weight over one more axis, and the next call compiles again)."""
    mesh = active_mesh()
    if mesh is None:
        return tree
    rules = current_rules()

    def leaf(x):
        if isinstance(x, nnx.Variable):
            return x.replace(jax.lax.with_sharding_constraint(x.get_value(), _variable_spec(x, mesh, rules)))
        return jax.lax.with_sharding_constraint(x, P())

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
