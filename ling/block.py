"""One decoder layer (pre-norm attention + MLP with residuals) and the MTP layer built around one."""
import jax
import jax.numpy as jnp
from flax import nnx

from ling.config import LingConfig
from ling.layers.context import ForwardContext
from ling.layers.lightning import LightningAttention
from ling.layers.mla import MLAttention
from ling.layers.mlp import SwiGLU
from ling.layers.moe import MoE
from ling.layers.norms import RMSNorm
from ling.layers.params import param
from sharding.rules import constrain

# Residual-stream layout between blocks: batch and sequence split as the rules say, the hidden dim split over
# tensor ("act_embed"), so the layer inputs saved for the backward pass are not replicated over tensor.
_RESIDUAL = ("batch", "length", "act_embed")


class DecoderBlock(nnx.Module):
    """x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)); attn is Lightning or MLA and
    mlp dense SwiGLU or MoE."""

    def __init__(self, config: LingConfig, *, mla: bool, moe: bool, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.mla = mla
        self.moe = moe
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, logical_axis="embed",
                                       param_dtype=param_dtype, rngs=rngs)
        self.attention = MLAttention(c, **kw) if mla else LightningAttention(c, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, logical_axis="embed",
                                                param_dtype=param_dtype, rngs=rngs)
        self.mlp = (MoE(c, **kw) if moe else
                    SwiGLU(c.hidden_size, c.intermediate_size, init_std=c.initializer_range,
                           param_dtype=param_dtype, dtype=dtype, rngs=rngs))

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, layer_idx, cache: dict | None, collect: bool = False):
        """-> (x [B, T, hidden], updated cache entry or None, aux dict).

        aux holds "load" [E] for MoE layers and, when `collect`, "hidden" (the residual after this layer) and the
        router's "topk_idx" / "router_logits".
        """
        x_btd = constrain(x_btd, _RESIDUAL)
        h = self.input_layernorm(x_btd)
        if self.mla:
            attn, new_cache = self.attention(h, ctx, cache)
        else:
            attn, state = self.attention(h, ctx, layer_idx, None if cache is None else cache["state"])
            new_cache = None if cache is None else {"state": state}
        x = x_btd + attn.astype(x_btd.dtype)
        h = self.post_attention_layernorm(x)
        aux = {}
        if self.moe:
            y, moe_aux = self.mlp(h)
            aux["load"] = moe_aux["load"]
            if collect:
                aux.update(topk_idx=moe_aux["topk_idx"], router_logits=moe_aux["router_logits"])
        else:
            y = self.mlp(h)
        x = constrain(x + y.astype(x.dtype), _RESIDUAL)
        if collect:
            aux["hidden"] = x
        return x, new_cache, aux


class MTPLayer(nnx.Module):
    """Multi-token-prediction layer: z = eh_proj([enorm(embed(ids shifted)), hnorm(h)]), an MLA+MoE block,
    final_layernorm. Its output feeds the shared lm_head and the next MTP layer."""

    def __init__(self, config: LingConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.dtype = dtype
        norm = dict(eps=c.rms_norm_eps, logical_axis="embed", param_dtype=param_dtype, rngs=rngs)
        self.enorm = RMSNorm(c.hidden_size, **norm)
        self.hnorm = RMSNorm(c.hidden_size, **norm)
        self.eh_proj = param(rngs, (2 * c.hidden_size, c.hidden_size), (None, "embed"), dtype=param_dtype,
                             std=c.initializer_range)
        self.block = DecoderBlock(c, mla=True, moe=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layernorm = RMSNorm(c.hidden_size, **norm)

    def __call__(self, emb_btd: jax.Array, h_btd: jax.Array, ctx: ForwardContext, layer_idx: int):
        """-> (hidden [B, T, hidden] after final_layernorm, aux of the inner block)."""
        z = jnp.concatenate([self.enorm(emb_btd), self.hnorm(h_btd)], axis=-1).astype(self.dtype)
        z = jnp.einsum("bte,ed->btd", z, self.eh_proj[...].astype(self.dtype))
        x, _, aux = self.block(z, ctx, layer_idx, None)
        return self.final_layernorm(x), aux
