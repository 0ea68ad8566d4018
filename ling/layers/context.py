"""What every attention layer of one forward pass shares: RoPE table, document boundaries, cache geometry."""
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    """Per-call inputs shared by all layers.

    cos/sin: [B, T, rotary_dim] float32 RoPE table at the tokens' positions.
    segment_ids: [B, T] int32 document ids for packed training rows (None: one document per row).
    lengths: [B] int32 tokens already in the cache before this call (None: no cache, full forward).
    page_table: [B, max_pages] int32 MLA cache pages of each sequence (with `lengths`).
    zigzag: the tokens are in the context-parallel zig-zag order (sharding.context_parallel.to_zigzag).
    """

    cos: jax.Array
    sin: jax.Array
    segment_ids: jax.Array | None = None
    lengths: jax.Array | None = None
    page_table: jax.Array | None = None
    zigzag: bool = False

    @property
    def cached(self) -> bool:
        return self.lengths is not None
