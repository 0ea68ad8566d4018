"""Sharding for ling: meshes, the logical-axis rules, placement of parameters, and the shard_map islands
(expert-parallel MoE dispatch, context-parallel Lightning and MLA) the model calls when a mesh is active.

    mesh = sharding.make_mesh({"fsdp": -1, "expert": 8})
    with jax.set_mesh(mesh):
        model = sharding.init_sharded(config, mesh, 0, dtype=jnp.bfloat16)
        step = jax.jit(train_step)   # batches placed with sharding.batch_sharding(mesh)
"""
from sharding.mesh import MESH_AXES, active_mesh, make_abstract_mesh, make_mesh
from sharding.placement import init_sharded, shard_model
from sharding.rules import (DEFAULT_RULES, batch_sharding, constrain, current_rules, logical_to_spec, make_rules,
                            param_shardings, param_specs, placement_spec, use_rules)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "active_mesh", "batch_sharding", "constrain", "current_rules",
           "init_sharded", "logical_to_spec", "make_abstract_mesh", "make_mesh", "make_rules", "param_shardings",
           "param_specs", "placement_spec", "shard_model", "use_rules"]
