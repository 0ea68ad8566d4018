"""Token sampling with per-row parameters (greedy where temperature is 0), shared by generate and serve."""
import jax
import jax.numpy as jnp


def sample_tokens(logits_bv: jax.Array, key: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array,
                  top_p_b: jax.Array) -> jax.Array:
    """Next tokens [B] int32 from float logits [B, V].

    temperature [B] (0 = greedy), top_k [B] int (0 = off), top_p [B] in (0, 1] (1 = off); all per row.
    """
    logits = logits_bv.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    scaled = logits / t
    sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    v = logits.shape[-1]
    k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    probs_sorted = jax.nn.softmax(jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc), axis=-1)
    # Keep the smallest prefix of the sorted distribution whose mass reaches top_p (the top token always stays).
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    cutoff_idx = jnp.sum(mass_before < top_p_b[:, None], axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx[:, None], axis=-1)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature_b > 0, sampled, greedy)
