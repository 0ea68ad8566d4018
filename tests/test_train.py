"""Training: falling loss, exact resume after SIGKILL, packing, gradient accumulation, expert-bias balancing,
YaRN continued pretraining, and clear errors for bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

import ling
from ling.layers.moe import MoE
from trainer.config import load_train_config
from trainer.loop import run
from trainer.metrics import read_metrics
from trainer.optimizer import OptimizerConfig, make_optimizer
from trainer.step import StepConfig, init_train_state, loss_sums, split_model, train_step
from tiny_configs import TINY, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {**TINY, "num_nextn_predict_layers": 1, "mtp_loss_scaling_factor": 0.3, "vocab_size": 64}
MODEL.pop("attention_impl")


def write_ids_dataset(path, n_docs=200, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            start = int(rng.integers(2, 60))
            doc = [(start + 3 * i) % 62 + 2 for i in range(int(rng.integers(5, 40)))]  # learnable arithmetic runs
            f.write(json.dumps({"ids": doc}) + "\n")


def write_config(tmp_path, **sections):
    data = tmp_path / "docs.jsonl"
    if not data.exists():
        write_ids_dataset(data)
    cfg = {"model": MODEL,
           "data": {"paths": str(data), "seq_len": 32, "global_batch_size": 4, "eos_id": 1, "pad_id": 0},
           "optimizer": {"peak_lr": 1e-2, "warmup_steps": 2, "total_steps": 40},
           "train": {"steps": 12, "log_every": 1, "save_every": 4, "keep_checkpoints": 5,
                     "async_checkpointing": False}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_loss_falls(tmp_path):
    path = write_config(tmp_path, train={"steps": 40, "log_every": 5, "save_every": 100})
    assert run(load_train_config(path), str(tmp_path / "w")) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "w")]
    assert losses[-1] < 0.6 * losses[0], losses
    assert os.path.exists(tmp_path / "w" / "losses.png") and os.listdir(tmp_path / "w" / "tb")


def _train_cmd(config, workdir):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config), "--workdir", str(workdir)]


def test_sigkill_resume_is_bit_exact(tmp_path):
    """Also with the persistent compilation cache: run a compiles and fills it, the later runs load from it, and
    every loss stays bit-identical."""
    config = write_config(tmp_path, train={"compilation_cache_dir": str(tmp_path / "xla")})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    subprocess.run(_train_cmd(config, tmp_path / "a"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(config, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once step 4 is committed and the run is past it
        ckpts = tmp_path / "b" / "checkpoints"
        done = [d for d in (os.listdir(ckpts) if ckpts.exists() else []) if d.isdigit()
                and os.path.exists(ckpts / d / "commit_success.txt")]
        if done and len(read_metrics(tmp_path / "b")) >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(tmp_path / "b"))
    assert killed_at < 12, "the run finished before it could be killed"
    out = subprocess.run(_train_cmd(config, tmp_path / "b"), check=True, env=env, capture_output=True, text=True,
                         timeout=600)
    assert "resumed from step" in out.stdout
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # One program for the fresh run, the killed one and the resumed one (a restored state is laid out as a new one).
    assert len([name for name in os.listdir(tmp_path / "xla") if "train_step" in name]) == 1


def _batch(ids_rows, seg_rows, pos_rows):
    ids = jnp.asarray(ids_rows, jnp.int32)
    seg = jnp.asarray(seg_rows, jnp.int32)
    same = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros((ids.shape[0], 1), bool)], 1) & (seg > 0)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((ids.shape[0], 1), jnp.int32)], 1)
    return {"input_ids": ids, "targets": targets, "loss_mask": same.astype(jnp.float32), "segment_ids": seg,
            "positions": jnp.asarray(pos_rows, jnp.int32)}


def test_document_loss_same_packed_or_alone():
    c = tiny_config(num_nextn_predict_layers=1)
    model = ling.LingModel(c, rngs=nnx.Rngs(0))
    cfg = StepConfig(mtp_loss_scale=0.3, z_loss_weight=1e-4, expert_bias_rate=0.0, grad_accum_steps=1)
    a, b = list(range(3, 15)), list(range(40, 60))
    packed = _batch([b + a], [[1] * 20 + [2] * 12], [list(range(20)) + list(range(12))])
    alone_a = _batch([a], [[1] * 12], [list(range(12))])
    alone_b = _batch([b], [[1] * 20], [list(range(20))])
    total = lambda batch: loss_sums(model, batch, cfg)[0]
    np.testing.assert_allclose(total(packed), total(alone_a) + total(alone_b), rtol=1e-5)


def _state_and_batch(seed=0, rate=0.0):
    c = tiny_config()
    model = ling.LingModel(c, rngs=nnx.Rngs(seed), remat="full")  # the step must compose with per-layer remat
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=10))
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, c.vocab_size, (8, 16))
    batch = _batch(ids, np.ones((8, 16)), np.tile(np.arange(16), (8, 1)))
    return model, tx, batch


def test_gradient_accumulation_equals_large_batch():
    model, _, batch = _state_and_batch()
    tx = optax.sgd(0.5)  # linear in the gradient, so parameters compare the accumulated gradients directly
    graphdef = split_model(model)[0]
    out = []
    for k in (1, 4):
        cfg = StepConfig(mtp_loss_scale=0.0, z_loss_weight=0.0, expert_bias_rate=1e-3, grad_accum_steps=k)
        fresh = jax.tree.map(jnp.copy, init_train_state(model, tx, 0))  # train_step donates its state
        state, metrics = train_step(graphdef, tx, cfg, fresh, batch)
        out.append((state, metrics))
    (s1, m1), (s4, m4) = out
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(x, y, atol=5e-6, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s1["rest"]), jax.tree.leaves(s4["rest"])):
        np.testing.assert_array_equal(x, y)


def test_expert_bias_moves_load_toward_balance():
    model, _, batch = _state_and_batch(seed=1)
    # Start badly skewed: +0.5 on expert 0 (sigmoid scores lie in (0, 1)) makes every token select it.
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoE):
            module.expert_bias[...] = module.expert_bias[...].at[..., 0].add(0.5)
    tx = optax.sgd(0.0)  # weights frozen: only the expert bias moves
    graphdef = split_model(model)[0]
    cfg = StepConfig(mtp_loss_scale=0.0, z_loss_weight=0.0, expert_bias_rate=0.02, grad_accum_steps=1)
    state = init_train_state(model, tx, 0)
    imbalance = []
    for _ in range(30):
        state, metrics = train_step(graphdef, tx, cfg, state, batch)
        imbalance.append(float(metrics["expert_load_imbalance"]))
    # Bias steps of 0.02 undo the skew in ~25 steps; with frozen weights the load would otherwise never move.
    assert imbalance[-1] < 0.5 * imbalance[0], imbalance


def test_yarn_stage_continues_from_a_pre_yarn_checkpoint(tmp_path):
    """YaRN switched on over a pre-YaRN published checkpoint, 4x longer sequences split over 8 fake devices."""
    base = ling.LingModel(ling.LingConfig.from_hf(MODEL), rngs=nnx.Rngs(0))
    ling.save_pretrained(base, tmp_path / "pre")
    path = write_config(tmp_path, model_overrides={
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        "max_position_embeddings": 128},
        data={"seq_len": 128}, train={"steps": 2, "init_from": str(tmp_path / "pre"), "save_every": 10},
        mesh={"context": 8})
    cfg = load_train_config(path)
    assert cfg.model.rope_scaling.factor == 4.0 and cfg.mesh == {"context": 8}
    assert run(cfg, str(tmp_path / "w")) == 0
    assert len(read_metrics(tmp_path / "w")) == 2


def test_step_compiles_once_under_a_mesh(tmp_path):
    """The step returns its state in the layout it was given (XLA otherwise picks other layouts for some updated
    weights, e.g. the MTP eh_proj split over tensor as well), so the second step reuses the first one's program."""
    path = write_config(tmp_path, train={"steps": 2, "save_every": 10}, mesh={"fsdp": 2, "tensor": 2, "expert": 2})
    train_step.clear_cache()
    assert run(load_train_config(path), str(tmp_path / "w")) == 0
    assert train_step._cache_size() == 1


def test_bad_inputs_give_clear_errors(tmp_path):
    path = write_config(tmp_path, train={"stepz": 3})
    with pytest.raises(ValueError, match="unknown keys \\['stepz'\\]"):
        load_train_config(path)
    path = write_config(tmp_path, data={"paths": str(tmp_path / "nope*.jsonl")})
    with pytest.raises(FileNotFoundError, match="nope"):
        run(load_train_config(path), str(tmp_path / "w1"))
    path = write_config(tmp_path, data={"paths": str(tmp_path / "docs.jsonl")})
    bad = tmp_path / "w2" / "checkpoints" / "4"
    bad.mkdir(parents=True)
    (bad / "garbage").write_text("not a checkpoint")
    (tmp_path / "w2" / "checkpoints" / "commit_success.txt").write_text("")
    with pytest.raises(Exception, match="checkpoint"):
        run(load_train_config(path, ["train.steps=1"]), str(tmp_path / "w2"))
    with pytest.raises(ValueError, match="override"):
        load_train_config(path, ["steps"])


def test_convert_both_ways(tmp_path):
    """A trained orbax checkpoint becomes a published checkpoint with the same weights, and back."""
    from ling.convert import to_orbax, to_safetensors

    path = write_config(tmp_path, train={"steps": 2, "save_every": 2})
    cfg = load_train_config(path)
    assert run(cfg, str(tmp_path / "w")) == 0
    assert to_safetensors(cfg, str(tmp_path / "w" / "checkpoints"), str(tmp_path / "hf")) == 2
    model = ling.from_pretrained(tmp_path / "hf")
    to_orbax(cfg, str(tmp_path / "hf"), str(tmp_path / "w2" / "checkpoints"))
    assert to_safetensors(cfg, str(tmp_path / "w2" / "checkpoints"), str(tmp_path / "hf2")) == 0
    again = ling.from_pretrained(tmp_path / "hf2")
    for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(k))
    ids = jnp.ones((1, 8), jnp.int32)
    assert np.isfinite(np.asarray(model(ids))).all()
