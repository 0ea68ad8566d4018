"""Batch generation: one compiled prefill, then one compiled single-token decode step per new token."""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ling.cache import constrain_cache, init_cache
from ling.model import LingModel
from ling.sampling import sample_tokens


# Both steps return the cache in one layout, so the decode step compiles once: its first call (after the prefill)
# and the later ones (after itself) see the same input shardings.
@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, state, input_ids, cache):
    out = nnx.merge(graphdef, state).forward(input_ids, cache=cache, last_logits_only=True)
    return out.logits[:, -1], constrain_cache(out.cache)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _decode(graphdef, state, token_b, cache):
    out = nnx.merge(graphdef, state).forward(token_b[:, None], cache=cache)
    return out.logits[:, -1], constrain_cache(out.cache)


def generate(model: LingModel, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, *, return_logits: bool = False):
    """New tokens [B, max_new_tokens] continuing `input_ids` [B, T] (greedy when temperature is 0).

    With return_logits, also the float32 logits [B, max_new_tokens, vocab] each token was drawn from.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with tokens >= 1; got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not 0 < top_p <= 1 or temperature < 0 or top_k < 0:
        raise ValueError(f"invalid sampling parameters temperature={temperature} top_p={top_p} top_k={top_k}")
    b, t = input_ids.shape
    graphdef, state = nnx.split(model)
    cache = init_cache(model.config, b, t + max_new_tokens, dtype=model.dtype)
    params = (jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_k, jnp.int32),
              jnp.full((b,), top_p, jnp.float32))
    key = jax.random.key(seed)
    logits, cache = _prefill(graphdef, state, input_ids, cache)
    tokens, all_logits = [], []
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = sample_tokens(logits, sub, *params)
        tokens.append(token)
        all_logits.append(logits)
        if i + 1 < max_new_tokens:
            logits, cache = _decode(graphdef, state, token, cache)
    new = jnp.stack(tokens, axis=1)
    return (new, jnp.stack(all_logits, axis=1)) if return_logits else new
