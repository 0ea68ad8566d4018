"""The layer stack's shape: a head, uniform groups scanned over, a tail.

Ling 2.5 repeats a group of `layer_group_size` layers (G-1 Lightning + 1 MLA, all MoE). The `n_groups` identical
groups have their parameters stacked on leading axes ([n_groups, G-1, ...] for the Lightning blocks, [n_groups, ...]
for the MLA block) and are applied with `jax.lax.scan`, so compile time does not grow with depth. Groups that
contain a dense-MLP layer form the head, a trailing incomplete group (all MLA) the tail; both are split into runs of
consecutive layers of one kind (attention x MLP), each run stacked and scanned, so the head of a model with dense
layers costs one compiled layer per kind (at most 3) rather than one per layer.
"""
import dataclasses
import enum
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ling.block import DecoderBlock
from ling.config import LingConfig


# Under Remat.NONE the results of these primitives are not kept: the backward pass recomputes them from the kept
# values they derive from, inside its own fused kernels. Keeping them costs memory and, in a scanned stack, a
# stacking buffer per value written in the forward and sliced in the backward (each a kernel to compile);
# recomputing them costs no matmul, gather, sort or kernel call.
_RECOMPUTED = frozenset({
    "abs", "add", "and", "broadcast_in_dim", "concatenate", "convert_element_type", "cos", "div", "dynamic_slice",
    "eq", "exp", "expand_dims", "ge", "gt", "integer_pow", "iota", "le", "log", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "not", "or", "pad", "reduce_max", "reduce_min", "reduce_sum", "reshape", "rsqrt", "select_n", "sign",
    "sin", "slice", "sqrt", "square", "squeeze", "sub", "tanh", "transpose"})


def _keep_costly(prim, *_, **__) -> bool:
    return prim.name not in _RECOMPUTED


class Remat(str, enum.Enum):
    """What a layer keeps for the backward pass."""

    NONE = "none"  # keep every matmul, gather, sort and kernel output; redo elementwise ops and reductions
    FULL = "full"  # keep only the layer inputs; recompute the rest
    DOTS = "dots"  # keep matmul outputs without batch dims (weights-stationary matmuls)

    def policy(self):
        return {Remat.NONE: _keep_costly, Remat.FULL: jax.checkpoint_policies.nothing_saveable,
                Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[self]


@dataclasses.dataclass(frozen=True)
class StackPlan:
    head: tuple[tuple[int, ...], ...]  # runs of same-kind layers before the groups
    group_start: int  # index of the first layer of the first scanned group
    n_groups: int
    group_size: int
    tail: tuple[tuple[int, ...], ...]  # runs after the groups

    @classmethod
    def from_config(cls, c: LingConfig) -> "StackPlan":
        g, n_layers = c.layer_group_size, c.num_hidden_layers
        n_full = n_layers // g
        dense_prefix = c.first_k_dense_replace if c.num_experts is not None else 0  # all dense: uniform groups
        n_head_groups = min(n_full, -(-dense_prefix // g))
        start = n_head_groups * g
        return cls(head=_runs(c, range(start)), group_start=start, n_groups=n_full - n_head_groups, group_size=g,
                   tail=_runs(c, range(n_full * g, n_layers)))


def _runs(c: LingConfig, layers) -> tuple[tuple[int, ...], ...]:
    """Consecutive layers split where the kind (MLA or Lightning, MoE or dense) changes."""
    runs: list[list[int]] = []
    kind = lambda i: (c.is_mla_layer(i), c.is_moe_layer(i))
    for i in layers:
        if runs and kind(runs[-1][-1]) == kind(i):
            runs[-1].append(i)
        else:
            runs.append([i])
    return tuple(map(tuple, runs))


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` modules from `make`, their variables stacked on a new leading axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r):
        return make(r)

    return build(rngs)


def apply_stacked(stacked: nnx.Module, carry, xs, body, *, scan: bool, remat: Remat | None):
    """Fold `body(module, carry, x) -> (carry, y)` over the leading axis of a stacked module and of `xs`.

    scan=True uses `jax.lax.scan` (one compiled layer); scan=False unrolls a Python loop over the same
    parameters (for testing the scan and for tiny models). remat=None applies no policy at this level (a body that
    applies its own per layer).
    """
    graphdef, state = nnx.split(stacked)

    def step(carry, inp):
        st, x = inp
        return body(nnx.merge(graphdef, st), carry, x)

    if remat is not None:
        step = jax.checkpoint(step, policy=remat.policy(), prevent_cse=not scan)
    if scan:
        return jax.lax.scan(step, carry, (state, xs))
    n = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def apply_run(blocks: nnx.Module, x, ctx, layer_ids, cache: dict | None, *, collect: bool, scan: bool,
              remat: Remat):
    """Apply a stacked run of same-kind DecoderBlocks (leading axis n) in order: x [B, T, D] ->
    (x, updated cache entry with the same leading [n] axis or None, aux with a leading [n] axis).

    layer_ids: [n] layer indices. Lightning states travel as scanned data; MLA page pools ([n, pages, ...]) are
    flattened into one pool in the scan carry, each layer addressing its pages through a page offset, so a step
    updates the pool in place instead of copying it through the scan's outputs.
    """
    layer_ids = jnp.asarray(layer_ids)
    if cache is None or "state" in cache:
        def body(block, x, inp):
            idx, entry = inp
            x, entry, aux = block(x, ctx, idx, entry, collect)
            return x, (entry, aux)

        x, (entry, aux) = apply_stacked(blocks, x, (layer_ids, cache), body, scan=scan, remat=remat)
        return x, entry, aux
    pool, n, pages = flat_pool(cache)

    def body(block, carry, inp):
        x, pool = carry
        j, idx = inp
        x, pool, aux = block(x, ctx, idx, {**pool, "page_offset": j * pages}, collect)
        return (x, pool), aux

    (x, pool), aux = apply_stacked(blocks, (x, pool), (jnp.arange(n), layer_ids), body, scan=scan, remat=remat)
    return x, stacked_pool(pool, n, pages), aux


def flat_pool(entry: dict):
    """MLA page pools stacked per layer {"latent": [n, pages, ...], "rope": ...} as one pool of n * pages pages
    (layer j owns pages [j * pages, (j + 1) * pages)); -> (pool, n, pages)."""
    n, pages = entry["latent"].shape[:2]
    return {k: v.reshape(n * pages, *v.shape[2:]) for k, v in entry.items()}, n, pages


def stacked_pool(pool: dict, n: int, pages: int) -> dict:
    """Inverse of flat_pool."""
    return {k: v.reshape(n, pages, *v.shape[1:]) for k, v in pool.items()}


def call_block(block: DecoderBlock, x, ctx, layer_idx, entry, collect: bool, remat: Remat):
    """block(x, ...) under the remat policy. Functional (split, checkpoint a pure function, merge inside) so it
    composes with any outer trace."""
    graphdef, state = nnx.split(block)

    def f(state, x, entry):
        return nnx.merge(graphdef, state)(x, ctx, layer_idx, entry, collect)

    return jax.checkpoint(f, policy=remat.policy())(state, x, entry)


class LayerGroup(nnx.Module):
    """G-1 Lightning blocks (stacked) followed by one MLA block; all MoE (all dense in a model without experts)."""

    def __init__(self, config: LingConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(moe=config.num_experts is not None, dtype=dtype, param_dtype=param_dtype)
        g = config.layer_group_size
        self.n_lightning = g - 1
        self.lightning = (stack_modules(lambda r: DecoderBlock(config, mla=False, rngs=r, **kw), g - 1, rngs)
                          if g > 1 else None)
        self.mla = DecoderBlock(config, mla=True, rngs=rngs, **kw)

    def __call__(self, x, ctx, first_layer, cache: dict | None, *, collect: bool, scan: bool, remat: Remat):
        """-> (x, updated cache {"lightning", "mla"} or None, aux with a leading [G] layer axis)."""
        cache = cache or {"lightning": None, "mla": None}
        auxes, new_lightning = [], None
        if self.lightning is not None:
            x, new_lightning, aux_l = apply_run(self.lightning, x, ctx, first_layer + jnp.arange(self.n_lightning),
                                                cache["lightning"], collect=collect, scan=scan, remat=remat)
            auxes.append(aux_l)
        x, new_mla, aux_m = call_block(self.mla, x, ctx, first_layer + self.n_lightning, cache["mla"], collect, remat)
        auxes.append(jax.tree.map(lambda a: a[None], aux_m))
        aux = jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)
        new_cache = None if cache["mla"] is None else {"lightning": new_lightning, "mla": new_mla}
        return x, new_cache, aux
