"""Dense SwiGLU MLP (the first `first_k_dense_replace` layers and the MoE's shared expert)."""
import jax
import jax.numpy as jnp
from flax import nnx

from ling.layers.params import param


class SwiGLU(nnx.Module):
    """down(silu(x @ gate) * (x @ up)); weights stored [in, out]."""

    def __init__(self, hidden: int, intermediate: int, *, init_std: float, param_dtype, dtype, rngs):
        self.dtype = dtype
        self.gate_proj = param(rngs, (hidden, intermediate), ("embed", "mlp"), dtype=param_dtype, std=init_std)
        self.up_proj = param(rngs, (hidden, intermediate), ("embed", "mlp"), dtype=param_dtype, std=init_std)
        self.down_proj = param(rngs, (intermediate, hidden), ("mlp", "embed"), dtype=param_dtype, std=init_std)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(self.dtype)
        g = jnp.einsum("...d,df->...f", x, self.gate_proj[...].astype(self.dtype))
        u = jnp.einsum("...d,df->...f", x, self.up_proj[...].astype(self.dtype))
        return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, self.down_proj[...].astype(self.dtype))
