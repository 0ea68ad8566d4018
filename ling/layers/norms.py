"""RMSNorm and the grouped RMSNorm of the Lightning output, with the reference's cast order."""
import jax
import jax.numpy as jnp
from flax import nnx

from ling.layers.params import param


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, groups: int = 1) -> jax.Array:
    """Normalise the last dim of `x` (split into `groups` equal parts) in fp32, cast back, then scale by `weight`.

    The cast back to x's dtype happens before the weight multiply, as in the reference.
    """
    shape = x.shape
    xf = x.astype(jnp.float32).reshape(*shape[:-1], groups, shape[-1] // groups)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.reshape(shape).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last dim; `groups` > 1 gives the reference's GroupRMSNorm (groups = number of groups)."""

    def __init__(self, dim: int, *, eps: float, groups: int = 1, logical_axis: str = "norm", param_dtype, rngs):
        self.eps = eps
        self.groups = groups
        self.weight = param(rngs, (dim,), (logical_axis,), dtype=param_dtype, value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.groups)
