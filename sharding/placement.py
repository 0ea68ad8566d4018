"""Putting a model's parameters in their shardings: an existing model, or a new one initialised in place."""
import jax
from flax import nnx

from sharding.rules import Rules, param_shardings


def shard_model(model: nnx.Module, mesh, rules: Rules | None = None) -> nnx.Module:
    """Move every variable of `model` to its rules' sharding on `mesh` (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def init_sharded(config, mesh, rngs_seed: int = 0, rules: Rules | None = None, **model_kwargs):
    """A new LingModel whose parameters are created directly in their shardings: the initialiser is traced
    abstractly, then run under jit with the rules' out_shardings, so no device ever holds a whole tensor
    it does not own. model_kwargs (dtype, param_dtype, remat, scan_layers) go to LingModel."""
    from ling.model import LingModel  # deferred: ling imports sharding, not the reverse

    def build():
        return LingModel(config, rngs=nnx.Rngs(rngs_seed), **model_kwargs)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = param_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
