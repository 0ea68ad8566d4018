"""The decode cache: a pytree mirroring the layer stack.

Lightning layers hold their recurrent state [B, H, D, D] in fp32 (constant in sequence length). MLA layers hold a
pool of pages of the compressed latent [num_pages, page_size, kv_lora_rank] and the rotated shared rope key
[num_pages, page_size, qk_rope_head_dim]; a page table [B, max_pages] maps each sequence's positions to pages and
one `lengths` [B] vector counts the tokens already cached (it is also the position of the next token).
"""
import jax
import jax.numpy as jnp
from flax import struct

from ling.config import LingConfig
from ling.stack import StackPlan
from sharding.rules import constrain


@struct.dataclass
class DecodeCache:
    lengths: jax.Array  # [B] int32
    page_table: jax.Array  # [B, max_pages] int32
    layers: dict  # {"head": [run entry], "groups": {"lightning": ..., "mla": ...} | None, "tail": [run entry]}
    page_size: int = struct.field(pytree_node=False)


def _entry(config: LingConfig, mla: bool, batch: int, num_pages: int, page_size: int, dtype, lead=()):
    c = config
    if mla:
        return {"latent": jnp.zeros((*lead, num_pages, page_size, c.kv_lora_rank), dtype),
                "rope": jnp.zeros((*lead, num_pages, page_size, c.qk_rope_head_dim), dtype)}
    h, d = c.num_attention_heads, c.head_dim
    return {"state": jnp.zeros((*lead, batch, h, d, d), jnp.float32)}


def init_cache(config: LingConfig, batch: int, max_len: int, *, dtype=jnp.float32, page_size: int | None = None,
               num_pages: int | None = None, page_table: jax.Array | None = None) -> DecodeCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    By default each sequence owns a contiguous run of pages (page_size = min(max_len, 256)); a serving engine passes
    its own pool size `num_pages` and `page_table` [batch, max_pages].
    """
    page_size = page_size or min(max_len, 256)
    pages_per_seq = -(-max_len // page_size)
    if page_table is None:
        num_pages = batch * pages_per_seq
        page_table = jnp.arange(num_pages, dtype=jnp.int32).reshape(batch, pages_per_seq)
    elif num_pages is None:
        raise ValueError("init_cache: num_pages is required with an explicit page_table")
    plan = StackPlan.from_config(config)
    run = lambda layers: _entry(config, config.is_mla_layer(layers[0]), batch, num_pages, page_size, dtype,
                                (len(layers),))
    groups = None
    if plan.n_groups:
        g = plan.group_size
        groups = {"lightning": (_entry(config, False, batch, num_pages, page_size, dtype, (plan.n_groups, g - 1))
                                if g > 1 else None),
                  "mla": _entry(config, True, batch, num_pages, page_size, dtype, (plan.n_groups,))}
    return DecodeCache(lengths=jnp.zeros((batch,), jnp.int32), page_table=jnp.asarray(page_table, jnp.int32),
                       layers={"head": [run(r) for r in plan.head], "groups": groups, "tail": [run(r) for r in plan.tail]},
                       page_size=page_size)


# ----- per-row views, for a serving engine that keeps many sequences in one cache -----
# Per-sequence arrays carry the batch axis: lengths and page_table on axis 0, a Lightning "state" leaf on axis -4
# (after any stacked-layer axes). MLA page pools have no batch axis: every row reads and writes the shared pool
# through its page table, so a row view returns the pools whole.

def _map_rows(fn, cache: DecodeCache, *others: DecodeCache) -> DecodeCache:
    """Apply fn(x, *others_x, axis) to every per-sequence array; page pools come from `cache`."""
    def leaf(path, x, *ys):
        return fn(x, *ys, x.ndim - 4) if path[-1] == jax.tree_util.DictKey("state") else x

    layers = jax.tree_util.tree_map_with_path(leaf, cache.layers, *(o.layers for o in others))
    return cache.replace(lengths=fn(cache.lengths, *(o.lengths for o in others), 0),
                         page_table=fn(cache.page_table, *(o.page_table for o in others), 0), layers=layers)


def take_rows(cache: DecodeCache, start, size: int) -> DecodeCache:
    """Rows [start, start + size) as a cache of batch `size` (start may be traced); the page pools are shared."""
    return _map_rows(lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, size, axis), cache)


def put_rows(cache: DecodeCache, start, rows: DecodeCache) -> DecodeCache:
    """`cache` with rows [start, start + rows' batch) replaced by `rows` (a take_rows view after a forward pass);
    the page pools are taken from `rows`, which carry that pass's writes."""
    out = _map_rows(lambda x, r, axis: jax.lax.dynamic_update_slice_in_dim(x, r.astype(x.dtype), start, axis),
                    cache, rows)
    pools = jax.tree_util.tree_map_with_path(
        lambda path, x, r: x if path[-1] == jax.tree_util.DictKey("state") else r, out.layers, rows.layers)
    return out.replace(layers=pools)


def constrain_cache(cache: DecodeCache) -> DecodeCache:
    """`cache` in the layout generation and serving keep between steps under the active mesh (identity without
    one): Lightning states split over batch rows and heads as the rules say, everything else whole on every shard.
    Steps that return their cache in the layout they were given reuse one compiled program per shape."""
    def leaf(path, x):
        return constrain(x, ("batch", "heads", None, None) if path[-1] == jax.tree_util.DictKey("state")
                         else (None,) * x.ndim)

    return jax.tree_util.tree_map_with_path(leaf, cache)


def where_rows(mask_b: jax.Array, on_true: DecodeCache, on_false: DecodeCache) -> DecodeCache:
    """Per row b, the per-sequence arrays of `on_true` where mask_b[b] else of `on_false` (same batch); the page
    pools are `on_true`'s."""
    def pick(x, y, axis):
        m = mask_b.reshape((-1,) + (1,) * (x.ndim - axis - 1))
        return jnp.where(m, x, y)

    return _map_rows(pick, on_true, on_false)
