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


@struct.dataclass
class DecodeCache:
    lengths: jax.Array  # [B] int32
    page_table: jax.Array  # [B, max_pages] int32
    layers: dict  # {"head": [entry], "groups": {"lightning": ..., "mla": ...} | None, "tail": [entry]}
    page_size: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold."""
        return self.page_table.shape[1] * self.page_size


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
    mk = lambda i, lead=(): _entry(config, config.is_mla_layer(i), batch, num_pages, page_size, dtype, lead)
    groups = None
    if plan.n_groups:
        g = plan.group_size
        groups = {"lightning": (_entry(config, False, batch, num_pages, page_size, dtype, (plan.n_groups, g - 1))
                                if g > 1 else None),
                  "mla": _entry(config, True, batch, num_pages, page_size, dtype, (plan.n_groups,))}
    return DecodeCache(lengths=jnp.zeros((batch,), jnp.int32), page_table=jnp.asarray(page_table, jnp.int32),
                       layers={"head": [mk(i) for i in plan.head], "groups": groups, "tail": [mk(i) for i in plan.tail]},
                       page_size=page_size)
