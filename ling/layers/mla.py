"""Multi-head latent attention (DeepSeek-V2 style) as in the reference's BailingMoeV2_5MultiLatentAttention.

Training and prefill expand per-head K/V from the compressed latent and call `mla_attention`. The cache keeps
only the normalised latent (kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim) per token, in pages.
Single-token decode absorbs W_UK into the query and W_UV into the output, so per-head K/V are never formed.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling.config import LingConfig
from ling.layers.context import ForwardContext
from ling.layers.dispatch import kernel_impl
from ling.layers.norms import RMSNorm
from ling.layers.params import param
from ling.layers.rope import apply_rope_interleaved, mla_softmax_scale
from pallas_kernels import mla_attention
from sharding import context_parallel

# The reference builds q_a_layernorm and kv_a_layernorm with the class default eps, not config.rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def write_pages(pages_psr: jax.Array, values_btr: jax.Array, page_table: jax.Array, start_b: jax.Array):
    """Scatter T new tokens per sequence into the page pool at positions start_b[b] + t."""
    page_size = pages_psr.shape[1]
    pos_bt = start_b[:, None] + jnp.arange(values_btr.shape[1])[None]
    page_bt = jnp.take_along_axis(page_table, pos_bt // page_size, axis=1)
    return pages_psr.at[page_bt, pos_bt % page_size].set(values_btr.astype(pages_psr.dtype))


def gather_window(pages_psr: jax.Array, page_table: jax.Array, end_b: jax.Array, width: int):
    """The `width` cached tokens ending at end_b[b] (exclusive) per sequence: values [B, W, R] and a validity
    mask [B, W] (False where the window reaches before position 0)."""
    page_size = pages_psr.shape[1]
    pos_bw = end_b[:, None] - width + jnp.arange(width)[None]
    valid = pos_bw >= 0
    pos_bw = jnp.maximum(pos_bw, 0)
    page_bw = jnp.take_along_axis(page_table, pos_bw // page_size, axis=1)
    return pages_psr[page_bw, pos_bw % page_size], valid


def attend_latent(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, *, segment_ids, scale, impl, interpret,
                  q_offset=None):
    """Causal attention with per-head K/V expanded from the latent [B, Tk, C] and shared rope key [B, Tk, R];
    query 0 sits at key position q_offset (None: the queries are the last Tq keys)."""
    k_nope = jnp.einsum("btr,rhn->bthn", latent_btr, w_uk)
    v = jnp.einsum("btr,rhv->bthv", latent_btr, w_uv)
    k_rot = jnp.broadcast_to(k_rot_btp[:, :, None], (*k_nope.shape[:3], k_rot_btp.shape[-1]))
    return mla_attention(jnp.concatenate([q_nope, q_rot], -1), jnp.concatenate([k_nope, k_rot], -1), v,
                         scale=scale, segment_ids=segment_ids, causal=True, q_offset=q_offset, impl=impl,
                         interpret=interpret)


class MLAttention(nnx.Module):
    def __init__(self, config: LingConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        c = config
        e, h, std = c.hidden_size, c.num_attention_heads, c.initializer_range
        bias = c.use_qkv_bias

        def maybe_bias(shape, axes):
            return param(rngs, shape, axes, dtype=param_dtype, value=0.0) if bias else None

        if c.q_lora_rank is None:
            self.q_proj = param(rngs, (e, h, c.qk_head_dim), ("embed", "heads", "head_dim"), dtype=param_dtype,
                                std=std)
        else:
            self.q_a_proj = param(rngs, (e, c.q_lora_rank), ("embed", "q_latent"), dtype=param_dtype, std=std)
            self.q_a_proj_bias = maybe_bias((c.q_lora_rank,), ("q_latent",))
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=_LATENT_NORM_EPS, logical_axis="q_latent",
                                         param_dtype=param_dtype, rngs=rngs)
            self.q_b_proj = param(rngs, (c.q_lora_rank, h, c.qk_head_dim), ("q_latent", "heads", "head_dim"),
                                  dtype=param_dtype, std=std)
        r, p = c.kv_lora_rank, c.qk_rope_head_dim
        self.kv_a_proj_with_mqa = param(rngs, (e, r + p), ("embed", "kv_latent"), dtype=param_dtype, std=std)
        self.kv_a_proj_with_mqa_bias = maybe_bias((r + p,), ("kv_latent",))
        self.kv_a_layernorm = RMSNorm(r, eps=_LATENT_NORM_EPS, logical_axis="kv_latent", param_dtype=param_dtype,
                                      rngs=rngs)
        self.kv_b_proj = param(rngs, (r, h, c.qk_nope_head_dim + c.v_head_dim), ("kv_latent", "heads", "head_dim"),
                               dtype=param_dtype, std=std)
        self.dense = param(rngs, (h, c.v_head_dim, e), ("heads", "head_dim", "embed"), dtype=param_dtype, std=std)
        self.dense_bias = maybe_bias((e,), ("embed",))

    def _w(self, p):
        return p[...].astype(self.dtype)

    def _query(self, x):
        c = self.config
        if c.q_lora_rank is None:
            return jnp.einsum("btd,dhk->bthk", x, self._w(self.q_proj))
        qa = jnp.einsum("btd,dq->btq", x, self._w(self.q_a_proj))
        if self.q_a_proj_bias is not None:
            qa = qa + self._w(self.q_a_proj_bias)
        return jnp.einsum("btq,qhk->bthk", self.q_a_layernorm(qa), self._w(self.q_b_proj))

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, cache: dict | None = None):
        """x [B, T, hidden] -> (y [B, T, hidden], updated cache {"latent", "rope"} pages or None)."""
        c, dt = self.config, self.dtype
        nope, r = c.qk_nope_head_dim, c.kv_lora_rank
        x = x_btd.astype(dt)
        q = self._query(x)
        q_nope, q_rot = q[..., :nope], apply_rope_interleaved(q[..., nope:], ctx.cos, ctx.sin)
        ckv = jnp.einsum("btd,dr->btr", x, self._w(self.kv_a_proj_with_mqa))
        if self.kv_a_proj_with_mqa_bias is not None:
            ckv = ckv + self._w(self.kv_a_proj_with_mqa_bias)
        latent_btr = self.kv_a_layernorm(ckv[..., :r])
        k_rot_btp = apply_rope_interleaved(ckv[..., None, r:], ctx.cos, ctx.sin)[:, :, 0]
        w_kv = self._w(self.kv_b_proj)
        w_uk, w_uv = w_kv[..., :nope], w_kv[..., nope:]
        impl, interpret = kernel_impl(c)
        scale = mla_softmax_scale(c)
        new_cache = None
        if ctx.cached:
            # Scanned groups share one flat pool for all their MLA layers; this layer's pages start at page_offset.
            page_table = ctx.page_table + cache.get("page_offset", 0)
            latent_pages = write_pages(cache["latent"], latent_btr, page_table, ctx.lengths)
            rope_pages = write_pages(cache["rope"], k_rot_btp, page_table, ctx.lengths)
            new_cache = {"latent": latent_pages, "rope": rope_pages}
        if ctx.cached and x.shape[1] == 1:
            q_latent = jnp.einsum("bhn,rhn->bhr", q_nope[:, 0], w_uk)
            o_latent = context_parallel.mla_decode(q_latent, q_rot[:, 0], latent_pages, rope_pages, page_table,
                                                   ctx.lengths + 1, scale=scale, impl=impl, interpret=interpret)
            o = jnp.einsum("bhr,rhv->bhv", o_latent.astype(dt), w_uv)[:, None]
        else:
            attend = functools.partial(attend_latent, scale=scale, impl=impl, interpret=interpret)
            if ctx.cached:
                # Attend to every cached token before this chunk plus the chunk itself: a window ending at the
                # chunk's last token, as wide as the cache, bottom-right aligned with the queries.
                width = page_table.shape[1] * latent_pages.shape[1]
                end = ctx.lengths + x.shape[1]
                latent_btr, valid = gather_window(latent_pages, page_table, end, width)
                k_rot_btp, _ = gather_window(rope_pages, page_table, end, width)
                latent_btr, k_rot_btp = latent_btr.astype(dt), k_rot_btp.astype(dt)
                segment_ids = (jnp.zeros(x.shape[:2], jnp.int32), jnp.where(valid, 0, 1).astype(jnp.int32))
                o = context_parallel.mla_attention_cached(attend, q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv,
                                                          segment_ids=segment_ids)
            else:  # under a mesh, a shard_map island (gathering the latent if the sequence is split)
                o = context_parallel.mla_attention(attend, q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv,
                                                   segment_ids=ctx.segment_ids, zigzag=ctx.zigzag)
        y = jnp.einsum("bthv,hvd->btd", o.astype(dt), self._w(self.dense))
        if self.dense_bias is not None:
            y = y + self._w(self.dense_bias)
        return y, new_cache
