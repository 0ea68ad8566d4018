"""Parameter creation with logical axis names.

Every parameter carries `logical_axes` metadata (names such as "embed", "heads", "mlp", "exp"); `sharding/rules.py`
maps them to mesh axes. Names live in metadata rather than in NNX's `out_sharding`, so a model can be built
without a mesh (tests, notebooks) and placed on any mesh later.
"""
import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str | None, ...], *, dtype,
          std: float | None = None, value: float | None = None) -> nnx.Param:
    """A Param of `shape`: N(0, std²) draws, or the constant `value` (norm weights)."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
    if value is not None:
        x = jnp.full(shape, value, dtype)
    else:
        x = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(x, logical_axes=logical_axes)
