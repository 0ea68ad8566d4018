"""Lightning linear attention (fla simple-GLA with a fixed per-head decay), as in the reference's
BailingMoeV2_5LinearAttention: fused qkv, QK-RMSNorm, partial NeoX RoPE, the recurrence, grouped RMSNorm of the
output, sigmoid output gate, output projection."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling.config import LingConfig, slopes_for_heads
from ling.layers.context import ForwardContext
from ling.layers.dispatch import kernel_impl
from ling.layers.norms import RMSNorm
from ling.layers.params import param
from ling.layers.rope import apply_rope_partial
from pallas_kernels import lightning_decode_step
from sharding import context_parallel


def lightning_log_decay(config: LingConfig, layer_idx: jax.Array | int) -> jax.Array:
    """Per-step log decay [H] (float32, < 0) of global layer `layer_idx`: -ALiBi slope · (1 - (i-1)/(L-1) + 1e-5)."""
    slopes = np.asarray(slopes_for_heads(config.num_attention_heads), np.float32)
    ramp = 1.0 - (jnp.asarray(layer_idx, jnp.float32) - 1.0) / (config.num_hidden_layers - 1) + 1e-5
    return -jnp.asarray(slopes) * ramp


class LightningAttention(nnx.Module):
    def __init__(self, config: LingConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        e, h, d = config.hidden_size, config.num_attention_heads, config.head_dim
        std = config.initializer_range
        self.query_key_value = param(rngs, (e, 3, h, d), ("embed", None, "heads", "head_dim"),
                                     dtype=param_dtype, std=std)
        self.query_key_value_bias = (param(rngs, (3, h, d), (None, "heads", "head_dim"), dtype=param_dtype,
                                           value=0.0) if config.use_qkv_bias else None)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(d, eps=config.rms_norm_eps, logical_axis="head_dim",
                                           param_dtype=param_dtype, rngs=rngs)
            self.key_layernorm = RMSNorm(d, eps=config.rms_norm_eps, logical_axis="head_dim",
                                         param_dtype=param_dtype, rngs=rngs)
        self.g_proj = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), dtype=param_dtype, std=std)
        self.g_norm = RMSNorm(h * d, eps=config.rms_norm_eps, groups=config.group_norm_size,
                              logical_axis="heads_merged", param_dtype=param_dtype, rngs=rngs)
        self.dense = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype=param_dtype, std=std)
        self.dense_bias = (param(rngs, (e,), ("embed",), dtype=param_dtype, value=0.0)
                           if config.use_bias else None)

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, layer_idx, state_bhkv: jax.Array | None = None):
        """x [B, T, hidden] -> (y [B, T, hidden], new state [B, H, D, D] fp32 or None without a cache)."""
        c, dt = self.config, self.dtype
        x = x_btd.astype(dt)
        qkv = jnp.einsum("btd,dshk->btshk", x, self.query_key_value[...].astype(dt))
        if self.query_key_value_bias is not None:
            qkv = qkv + self.query_key_value_bias[...].astype(dt)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if c.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = apply_rope_partial(q, ctx.cos, ctx.sin)
        k = apply_rope_partial(k, ctx.cos, ctx.sin)
        log_decay = lightning_log_decay(c, layer_idx)
        impl, interpret = kernel_impl(c)
        if ctx.cached and x.shape[1] == 1:
            o, new_state = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state_bhkv)
            o = o[:, None]
        else:
            # The kernel call itself without a mesh; under one, a shard_map island (context-parallel if the
            # sequence is split).
            o, new_state = context_parallel.lightning_attention(q, k, v, log_decay, initial_state=state_bhkv,
                                                                segment_ids=ctx.segment_ids, zigzag=ctx.zigzag,
                                                                impl=impl, interpret=interpret)
        b, t = x.shape[:2]
        o = self.g_norm(o.astype(dt).reshape(b, t, -1)).reshape(o.shape)
        gate = jnp.einsum("btd,dhk->bthk", x, self.g_proj[...].astype(dt))
        y = jnp.einsum("bthk,hkd->btd", o * jax.nn.sigmoid(gate), self.dense[...].astype(dt))
        if self.dense_bias is not None:
            y = y + self.dense_bias[...].astype(dt)
        return y, (new_state if ctx.cached else None)
