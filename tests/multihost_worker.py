"""The job tests/test_multihost.py runs twice: in 2 processes of 4 CPU devices each, and in 1 process of 8.

    python tests/multihost_worker.py PROCESS_ID PORT WORKDIR

One SGD step of tiny-a on a data x expert x fsdp mesh (data spans the processes), an orbax save, and a restore onto
a fsdp x tensor mesh, compared with what was saved through a position-dependent fingerprint of every parameter.
Process 0 writes WORKDIR/result.npz.
"""
import sys

import jax
import numpy as np

AXES = {"data": 2, "expert": 2, "fsdp": 2}
RESTORE_AXES = {"fsdp": 4, "tensor": 2}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def run_job(workdir: str, fixture_dir: str) -> dict:
    """Returns the job's results as host numpy arrays (on every process)."""
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import multihost_utils

    import ling
    import sharding
    from trainer.checkpointing import TrainCheckpointer

    mesh = sharding.make_mesh(AXES)
    rng = np.random.default_rng(0)
    ids_np = rng.integers(0, 256, (8, 24)).astype(np.int32)
    with jax.set_mesh(mesh):
        model = ling.from_pretrained(fixture_dir, dtype=jnp.float32, mesh=mesh)
        graphdef, state = nnx.split(model)
        ids = jax.make_array_from_callback(ids_np.shape, sharding.batch_sharding(mesh), lambda i: ids_np[i])

        def loss_fn(params, ids):
            out = nnx.merge(graphdef, params).forward(ids)
            logp = jax.nn.log_softmax(out.logits[:, :-1])
            return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean(), out.logits

        def sgd_step(params, ids):
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids)
            return loss, logits, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

        step_fn = jax.jit(sgd_step, compiler_options=FAST_COMPILE)
        loss0, logits, state = step_fn(state, ids)
        loss1 = step_fn(state, ids)[0]  # the loss after the step
        ckpt = TrainCheckpointer(f"{workdir}/ckpt", save_interval_steps=1, max_to_keep=1, async_save=False)
        ckpt.save_now(1, {"params": nnx.to_pure_dict(state)}, {"job": "multihost"})
        saved_print = fingerprint(nnx.to_pure_dict(state))
        logits = multihost_utils.process_allgather(logits, tiled=True)

    mesh2 = sharding.make_mesh(RESTORE_AXES)
    with jax.set_mesh(mesh2):
        target_state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                                                sharding=s.get_value())),
                                    state, sharding.param_shardings(state, mesh2),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable))
        step, restored, meta = ckpt.restore_latest({"params": nnx.to_pure_dict(target_state)})
        ckpt.close()
        meshes = {leaf.sharding.mesh.shape_tuple for leaf in jax.tree.leaves(restored)}
        restored_print = fingerprint(restored["params"])
    assert step == 1 and meta == {"job": "multihost"} and meshes == {mesh2.shape_tuple}, (step, meta, meshes)
    return {"loss0": np.asarray(loss0), "loss1": np.asarray(loss1), "logits": np.asarray(logits),
            "saved": np.asarray(saved_print), "restored": np.asarray(restored_print)}


def fingerprint(tree):
    """[leaves, 2] float32: each leaf summed against a fixed position-dependent pattern (a permutation of elements
    changes it), and the sum of the absolute terms (the scale of its rounding error)."""
    import jax.numpy as jnp

    def one(x):
        terms = x.astype(jnp.float32) * jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
        return jnp.stack([jnp.sum(terms), jnp.sum(jnp.abs(terms))])

    return jax.jit(lambda t: jnp.stack([one(x) for x in jax.tree.leaves(t)]), compiler_options=FAST_COMPILE)(tree)


def main():
    process_id, port, workdir, fixture_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    result = run_job(workdir, fixture_dir)
    if process_id == 0:
        np.savez(f"{workdir}/result.npz", **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
