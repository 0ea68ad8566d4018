"""The training loop behind train.py: build or restore the state, step, log, checkpoint, sample."""
import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ling
from benchmarks.peaks import detect_chip
from trainer.checkpointing import TrainCheckpointer, install_sigterm_handler
from trainer.config import TrainConfig
from trainer.corpus import write_quickstart_dataset
from trainer.data import DataConfig, make_iterator
from trainer.flops import flops_per_token
from trainer.metrics import MetricsLogger, format_progress, plot_losses
from trainer.optimizer import learning_rate_schedule, make_optimizer
from trainer.step import StepConfig, init_train_state, split_model, train_step
from trainer.tokenizer import load_tokenizer

log = logging.getLogger("train")


class NonFiniteLoss(RuntimeError):
    pass


def _data_config(cfg: TrainConfig, workdir: str) -> DataConfig:
    kwargs = dict(cfg.data)
    if kwargs.pop("quickstart", False):
        files = write_quickstart_dataset(os.path.join(workdir, "data"), vocab_size=cfg.model.vocab_size)
        kwargs.setdefault("paths", files.data_path)
        kwargs.setdefault("tokenizer", files.tokenizer_path)
    try:
        return DataConfig(**kwargs)
    except TypeError as e:
        raise ValueError(f"config section 'data': {e}") from None


def _build_model(cfg: TrainConfig, mesh):
    t = cfg.train
    kw = dict(dtype=jnp.dtype(t.compute_dtype), param_dtype=jnp.dtype(t.param_dtype), remat=t.remat)
    if mesh is not None:
        from sharding import init_sharded
        model = init_sharded(cfg.model, mesh, t.seed, **kw)
    else:
        model = ling.LingModel(cfg.model, rngs=nnx.Rngs(t.seed), **kw)
    if t.init_from:
        # Continued pretraining (e.g. the YaRN stage): weights from a published checkpoint, config from this run.
        source = ling.from_pretrained(t.init_from, dtype=jnp.dtype(t.param_dtype), mesh=mesh)
        if source.config.replace(rope_scaling=None, max_position_embeddings=0) != \
                cfg.model.replace(rope_scaling=None, max_position_embeddings=0, attention_impl=source.config.attention_impl):
            raise ValueError(f"train.init_from={t.init_from}: its config.json differs from the run's model config in "
                             "more than rope_scaling / max_position_embeddings")
        nnx.update(model, nnx.state(source))
    return model


def _device_batch(batch: dict, mesh):
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    from sharding import batch_sharding
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def run(cfg: TrainConfig, workdir: str, profile: tuple[int, int] | None = None) -> int:
    """Train until cfg.train.steps; returns the process exit code. With a `mesh:` section everything runs under
    that mesh (the model's sharding constraints and shard_map islands read it)."""
    if cfg.train.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.train.compilation_cache_dir))
    if not cfg.mesh:
        return _run(cfg, workdir, None, profile)
    from sharding import make_mesh
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return _run(cfg, workdir, mesh, profile)


def _run(cfg: TrainConfig, workdir: str, mesh, profile) -> int:
    t = cfg.train
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    data_cfg = _data_config(cfg, workdir)
    model = _build_model(cfg, mesh)
    tx = make_optimizer(dataclasses.replace(cfg.optimizer, grad_accum_steps=1))
    step_cfg = StepConfig(mtp_loss_scale=float(cfg.model.mtp_loss_scaling_factor), z_loss_weight=t.z_loss_weight,
                          expert_bias_rate=t.expert_bias_rate, grad_accum_steps=cfg.optimizer.grad_accum_steps)
    if data_cfg.global_batch_size % (cfg.optimizer.grad_accum_steps * jax.process_count()):
        raise ValueError(f"data.global_batch_size={data_cfg.global_batch_size} must be divisible by "
                         f"optimizer.grad_accum_steps={cfg.optimizer.grad_accum_steps} x processes")
    graphdef = split_model(model)[0]
    state = init_train_state(model, tx, t.seed)
    if mesh is None:  # committed, like a restored state: a restart then lowers (and cache-loads) the same program
        state = jax.device_put(state, jax.devices()[0])
    del model
    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=t.save_every,
                                     max_to_keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    iterator = make_iterator(data_cfg)
    is_main = jax.process_index() == 0  # one writer for the shared workdir's logs
    metrics = MetricsLogger(workdir) if is_main else None
    restored = checkpointer.restore_latest(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state), mesh=mesh)
    if restored is not None:
        step, state, meta = restored
        if meta.get("data") is not None:  # None: converted from a published checkpoint, data starts fresh
            iterator.set_state(meta["data"])
        if is_main:
            metrics.truncate_after(step)
            print(f"resumed from step {step} in {checkpointer.directory}", flush=True)
    else:
        step = 0
        if is_main:
            metrics.truncate_after(-1)
    stop = install_sigterm_handler()
    chip = detect_chip()
    schedule = learning_rate_schedule(cfg.optimizer)
    tokens_per_step = data_cfg.global_batch_size * data_cfg.seq_len
    flops = flops_per_token(cfg.model, data_cfg.seq_len)
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    try:
        while step < t.steps:
            if profile and step == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            batch = _device_batch(next(iterator), mesh)
            state, m = train_step(graphdef, tx, step_cfg, state, batch)
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"step {step + 1}: loss is {loss}; stopping before any checkpoint is written "
                                    f"(last good checkpoint: step {max(checkpointer.all_steps(), default=None)})")
            step += 1
            window_steps += 1
            window_loss += loss
            if profile and step == profile[1]:
                jax.profiler.stop_trace()
            if is_main and (step % t.log_every == 0 or step == t.steps):
                elapsed = time.perf_counter() - window_start
                record = {k: float(v) for k, v in m.items()}  # this step's values, except:
                record.update(loss=window_loss / window_steps,  # the mean over the steps since the last record
                              lr=float(schedule(step - 1)), tokens_per_s=window_steps * tokens_per_step / elapsed)
                if chip is not None:
                    record["mfu"] = record["tokens_per_s"] * flops / (chip.bf16_flops * jax.device_count())
                metrics.log(step, record)
                print(format_progress(step, record), flush=True)
                window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
            checkpointer.maybe_save(step, state, {"data": iterator.get_state()})
            if stop.is_set():
                print(f"SIGTERM: saving step {step} and exiting", flush=True)
                checkpointer.save_now(step, state, {"data": iterator.get_state()})
                return 0
        checkpointer.save_now(step, state, {"data": iterator.get_state()})
    except NonFiniteLoss as e:
        print(f"error: {e}", flush=True)
        return 1
    finally:
        checkpointer.close()
        if is_main:
            metrics.close()
    if is_main:
        print(f"loss plot: {plot_losses(workdir)}", flush=True)
    _sample(cfg, graphdef, state, data_cfg, print_it=is_main)
    return 0


def _sample(cfg: TrainConfig, graphdef, state, data_cfg: DataConfig, print_it: bool) -> None:
    t = cfg.train
    if not (t.sample_prompt and data_cfg.tokenizer):
        return
    tok = load_tokenizer(data_cfg.tokenizer)
    model = nnx.merge(graphdef, state["params"], state["rest"])
    ids = tok.encode(t.sample_prompt).ids
    new = ling.generate(model, np.asarray([ids], np.int32), max_new_tokens=t.sample_tokens,
                        temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed)
    if print_it:
        print(f"sample: {t.sample_prompt}{tok.decode(np.asarray(new[0]).tolist())}", flush=True)
