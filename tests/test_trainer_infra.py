"""Optimizer, checkpointing, metrics and FLOP counting (trainer/). Every expectation is computed independently:
closed-form float64 formulas, a bit-wise CRC and a hand-written protobuf reader, checkpoint tensor shapes."""
import glob
import logging
import math
import os
import signal
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from conftest import FIXTURE_DIR
from ling.config import LingConfig
from trainer import checkpointing, flops, metrics
from trainer.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer, weight_decay_mask


# ---------------------------------------------------------------- optimizer
def test_schedule_warmup_peak_cosine_end():
    cfg = OptimizerConfig(peak_lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, total_steps=110)
    lr = learning_rate_schedule(cfg)
    lo = 1e-4

    def expected(s):
        if s < 10:
            return 1e-3 * s / 10
        frac = min(s - 10, 100) / 100
        return lo + (1e-3 - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    for s in (0, 5, 10, 35, 60, 85, 110, 500):
        np.testing.assert_allclose(float(lr(s)), expected(s), rtol=1e-5, atol=1e-9, err_msg=f"step {s}")
    assert float(lr(10)) == pytest.approx(1e-3) and float(lr(60)) == pytest.approx(5.5e-4)
    assert float(lr(110)) == pytest.approx(1e-4) and float(lr(10_000)) == pytest.approx(1e-4)


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="warmup_steps=20"):
        OptimizerConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimizerConfig(min_lr_ratio=1.5)


def _stacked_params():
    L, h, E = 3, 8, 4
    z = lambda *s: jnp.full(s, 2.0, jnp.float32)  # noqa: E731
    return {
        "embed": {"embedding": z(16, h)},
        "layers": {
            "input_layernorm": {"scale": z(L, h)},  # stacked norm: 2-D
            "attention": {
                "query_key_value": {"kernel": z(L, h, 3 * h)},
                "query_layernorm": {"scale": z(L, 2, h)},  # 3-D norm weight
                "g_norm": {"weight": z(L, h)},
                "dense": {"kernel": z(L, h, h), "bias": z(L, h)},
            },
            "mlp": {"gate": {"weight": z(L, E, h), "expert_bias": z(L, E)},
                    "experts": {"up": z(L, E, h, 2 * h)}},
        },
        "norm": {"scale": z(h)},
        "lm_head": {"kernel": z(h, 16)},
    }


NO_DECAY = {"layers/input_layernorm/scale", "layers/attention/query_layernorm/scale", "layers/attention/g_norm/weight",
            "layers/attention/dense/bias", "layers/mlp/gate/expert_bias", "norm/scale"}


def _flat(tree):
    return {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_by_name_and_effect():
    params = _stacked_params()
    mask = _flat(weight_decay_mask(params))
    assert {k for k, v in mask.items() if not v} == NO_DECAY
    assert len(mask) == 12
    # Behaviour: with zero gradients AdamW's update is -lr·wd·p on decayed leaves and exactly 0 elsewhere.
    cfg = OptimizerConfig(peak_lr=0.1, min_lr_ratio=1.0, warmup_steps=0, total_steps=10, weight_decay=0.5)
    tx = make_optimizer(cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for k, u in _flat(updates).items():
        want = 0.0 if k in NO_DECAY else -0.1 * 0.5 * 2.0
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=k)


def test_decay_mask_on_nnx_state():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(4, 4, use_bias=True, rngs=rngs)
            self.post_attention_layernorm = nnx.RMSNorm(4, rngs=rngs)

    model = Block(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    cfg = OptimizerConfig(peak_lr=0.1, min_lr_ratio=1.0, warmup_steps=0, total_steps=10, weight_decay=0.5)
    opt = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(after["proj"]["kernel"], 0.95 * before["proj"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(after["proj"]["bias"], before["proj"]["bias"])
    np.testing.assert_array_equal(after["post_attention_layernorm"]["scale"],
                                  before["post_attention_layernorm"]["scale"])


def test_global_norm_clipping():
    # With eps >> |g| Adam's first step is -lr·g/(|g| + eps): linear in g, so clipping shows in the update.
    rng = np.random.default_rng(0)
    g = {"a": rng.normal(size=(5, 3)) * 20, "b": rng.normal(size=(7,)) * 20}
    norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
    assert norm > 50
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), g)
    for clip in (1.0, 1e4):
        cfg = OptimizerConfig(peak_lr=0.5, min_lr_ratio=1.0, warmup_steps=0, total_steps=10, weight_decay=0.0,
                              eps=1e3, clip_norm=clip)
        tx = make_optimizer(cfg)
        upd, _ = tx.update(jax.tree.map(jnp.float32, g), tx.init(params), params)
        scale = min(1.0, clip / norm)
        for k in g:
            gc = g[k] * scale
            np.testing.assert_allclose(np.asarray(upd[k]), -0.5 * gc / (np.abs(gc) + 1e3), rtol=2e-5, atol=1e-9)


def test_grad_accumulation_matches_mean_gradient():
    params = {"w": jnp.ones((4,), jnp.float32)}
    g1, g2 = {"w": jnp.array([1.0, -2, 3, 0.5])}, {"w": jnp.array([0.5, 1, -1, 2.0])}
    base = dict(peak_lr=0.1, min_lr_ratio=1.0, warmup_steps=0, total_steps=10, weight_decay=0.1, clip_norm=None)
    acc = make_optimizer(OptimizerConfig(grad_accum_steps=2, **base))
    state = acc.init(params)
    u1, state = acc.update(g1, state, params)
    np.testing.assert_array_equal(np.asarray(u1["w"]), 0.0)
    u2, _ = acc.update(g2, state, params)
    one = make_optimizer(OptimizerConfig(**base))
    ref, _ = one.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one.init(params), params)
    np.testing.assert_allclose(np.asarray(u2["w"]), np.asarray(ref["w"]), rtol=1e-6)


# ---------------------------------------------------------------- checkpointing
@pytest.fixture
def open_ckpt():
    """TrainCheckpointer factory; every one it opens is closed (threads joined) at teardown."""
    opened = []

    def make(directory, interval=1, keep=5):
        opened.append(checkpointing.TrainCheckpointer(directory, save_interval_steps=interval, max_to_keep=keep))
        return opened[-1]

    yield make
    for c in opened:
        c.close()


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _train_state(mesh, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w": jax.device_put(jax.random.normal(k1, (16, 8), jnp.float32), NamedSharding(mesh, P("data", None))),
        "e": jax.device_put(jax.random.normal(k2, (8, 16)).astype(jnp.bfloat16), NamedSharding(mesh, P(None, "model"))),
        "norm": {"scale": jnp.ones((16,), jnp.float32)},
    }
    tx = make_optimizer(OptimizerConfig(warmup_steps=1, total_steps=10))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(seed), "rng": jax.random.key(seed + 7)}


def _assert_bit_exact(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))


def test_checkpoint_roundtrip_keep_n_and_resharding(tmp_path, open_ckpt):
    mesh = _mesh()
    ckpt = open_ckpt(tmp_path / "ck", 2, 2)
    states = {s: _train_state(mesh, s) for s in range(6)}
    started = [ckpt.maybe_save(s, states[s], {"data": {"next_index": 10 * s}}) for s in range(5)]
    assert started == [True, False, True, False, True]
    ckpt.save_now(5, states[5], {"data": {"next_index": 50}, "note": "sigterm"})
    assert ckpt.all_steps() == [4, 5]  # keep-N

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[5])
    step, state, meta = ckpt.restore_latest(abstract)
    assert step == 5 and meta == {"data": {"next_index": 50}, "note": "sigterm"}
    _assert_bit_exact(state, states[5])

    # Onto a different sharding: "w" was P("data", None), "e" was P(None, "model").
    new = {"w": NamedSharding(mesh, P(None, "model")), "e": NamedSharding(mesh, P("data", "model"))}
    target = dict(abstract, params=dict(abstract["params"], **{
        k: jax.ShapeDtypeStruct(abstract["params"][k].shape, abstract["params"][k].dtype, sharding=s)
        for k, s in new.items()}))
    _, state2, _ = open_ckpt(tmp_path / "ck", 2, 2).restore_latest(target)
    for k, s in new.items():
        assert state2["params"][k].sharding == s
    _assert_bit_exact(state2, states[5])

    # AbstractMesh targets (nnx.eval_shape under jax.set_mesh) need the concrete mesh.
    abstract_mesh = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh.abstract_mesh, P("data")))}
    ck_w = open_ckpt(tmp_path / "w", 1, 1)
    ck_w.save_now(1, {"w": states[1]["params"]["w"]}, {})
    with pytest.raises(ValueError, match="AbstractMesh"):
        ck_w.restore_latest(abstract_mesh)
    _, got, _ = ck_w.restore_latest(abstract_mesh, mesh=mesh)
    assert got["w"].sharding == NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(states[1]["params"]["w"]))


# A failed orbax restore leaves its other shard reads' coroutines un-awaited; asyncio reports them at teardown.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_incomplete_checkpoints_are_skipped_not_deleted(tmp_path, caplog, open_ckpt):
    d = tmp_path / "ck"
    big = lambda s: {"x": jnp.arange(200_000, dtype=jnp.float32) + s, "step": jnp.int32(s)}  # noqa: E731
    ckpt = open_ckpt(d)
    for s in (1, 2, 3):
        ckpt.maybe_save(s, big(s), {"s": s})
    ckpt.wait()
    # Step 3: commit marker gone. Step 2: largest data file truncated. Step 4: a write that never renamed.
    os.remove(d / "3" / checkpointing.COMMIT_MARKER)
    largest = max(glob.glob(str(d / "2" / "state" / "**" / "*"), recursive=True), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    os.makedirs(d / "4.orbax-checkpoint-tmp-1234" / "state")

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), big(0))
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        step, state, meta = open_ckpt(d).restore_latest(abstract)
    assert step == 1 and meta == {"s": 1}
    np.testing.assert_array_equal(np.asarray(state["x"]), np.arange(200_000, dtype=np.float32) + 1)
    text = caplog.text
    assert f"skipping incomplete checkpoint {d}/4.orbax-checkpoint-tmp-1234 (write did not finish)" in text
    assert f"skipping incomplete checkpoint {d}/3 (no {checkpointing.COMMIT_MARKER})" in text
    assert f"skipping unreadable checkpoint {d}/2: " in text
    # The good step is untouched; the bad ones were moved aside, not deleted.
    assert sorted(os.listdir(d / checkpointing.QUARANTINE))[0].startswith("2.")
    assert len(os.listdir(d / checkpointing.QUARANTINE)) == 3
    # The resumed run can write step 2 again and it becomes the latest.
    ckpt2 = open_ckpt(d)
    assert ckpt2.all_steps() == [1]
    ckpt2.save_now(2, big(20), {"s": 20})
    step, state, meta = ckpt2.restore_latest(abstract)
    assert step == 2 and meta == {"s": 20} and float(state["x"][0]) == 20.0


def test_unusable_checkpoint_directory_errors(tmp_path, open_ckpt):
    d = tmp_path / "ck"
    abstract = {"x": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    assert open_ckpt(d, 1, 2).restore_latest(abstract) is None
    ck = open_ckpt(d, 1, 2)
    ck.save_now(1, {"x": jnp.ones(4)}, {})
    with open(d / "1" / "meta" / "metadata", "w") as f:
        f.write('{"trunc')
    with pytest.raises(checkpointing.NoUsableCheckpointError, match=str(d)):
        open_ckpt(d, 1, 2).restore_latest(abstract)
    assert os.path.isdir(d / "1")  # nothing was moved when nothing could be restored
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpointing.NoUsableCheckpointError, match=str(tmp_path / "file")):
        checkpointing.TrainCheckpointer(tmp_path / "file", save_interval_steps=1, max_to_keep=2)


def test_sigterm_flag():
    old = signal.getsignal(signal.SIGTERM)
    try:
        flag = checkpointing.install_sigterm_handler()
        assert not flag.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.wait(5.0)
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- metrics
def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _unmask(m):
    r = (m - 0xA282EAD8) & 0xFFFFFFFF
    return ((r >> 17) | (r << 15)) & 0xFFFFFFFF


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; bytes for length-delimited, raw bytes for fixed."""
    i, out = 0, []
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i:i + n], i + n
        else:
            raise AssertionError(f"wire type {wire}")
        out.append((field, wire, val))
    return out


def _read_varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _decode_events(path):
    """[(step, {tag: value})] from a tfevents file, checking both CRCs of every record."""
    data = open(path, "rb").read()
    i, events = 0, []
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[i + 8:i + 12])
        assert _unmask(len_crc) == _crc32c_bitwise(header)
        body = data[i + 12:i + 12 + n]
        (body_crc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        assert _unmask(body_crc) == _crc32c_bitwise(body)
        i += 16 + n
        f = {field: val for field, _, val in _fields(body)}
        assert struct.unpack("<d", f[1])[0] > 1.6e9  # wall_time
        if 3 in f:
            assert f[3] == b"brain.Event:2" and not events
            continue
        scalars = {}
        for field, _, value in _fields(f[5]):
            assert field == 1
            v = {fn: val for fn, _, val in _fields(value)}
            scalars[v[1].decode()] = struct.unpack("<f", v[2])[0]
        events.append((f.get(2, 0), scalars))
    return events


def _all_events(tb_dir):
    files = glob.glob(os.path.join(tb_dir, "*tfevents*"))
    return sorted(e for p in files for e in _decode_events(p))


def test_crc32c_known_vectors():
    assert metrics.crc32c(b"123456789") == 0xE3069283
    assert metrics.crc32c(b"") == 0
    blob = bytes(range(256)) * 3
    assert metrics.crc32c(blob) == _crc32c_bitwise(blob)


def _log_run(logger, steps):
    for s in steps:
        logger.log(s, {"loss": np.float32(5.0 - 0.1 * s), "lr": jnp.float32(1e-3 * s), "tokens_per_s": 1234.5 * s})


def test_metrics_jsonl_tfevents_and_resume_truncation(tmp_path):
    logger = metrics.MetricsLogger(tmp_path)
    _log_run(logger, range(10))
    # Flushed on every write: readable before close.
    recs = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(10))
    assert recs[3]["loss"] == pytest.approx(4.7) and recs[3]["tokens_per_s"] == pytest.approx(3703.5)
    ev = _all_events(tmp_path / "tb")
    assert [s for s, _ in ev] == list(range(10))
    for (s, sc), r in zip(ev, recs):
        assert set(sc) == {"loss", "lr", "tokens_per_s"}
        for k in sc:
            assert sc[k] == np.float32(r[k])
    # Crash mid-write, then resume from a checkpoint at step 5 and run on to step 7.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')
    resumed = metrics.MetricsLogger(tmp_path)
    resumed.truncate_after(5)
    _log_run(resumed, range(6, 8))
    resumed.close()
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == list(range(8))
    assert [s for s, _ in _all_events(tmp_path / "tb")] == list(range(8))
    with pytest.raises(ValueError, match="numeric scalar"):
        metrics._scalars({"loss": np.ones(3)})


def test_tfevents_with_protobuf_runtime(tmp_path):
    """Second opinion from the protobuf runtime, with Event/Summary/Value declared from their field numbers."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="t", syntax="proto3")
    value = fd.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summ = fd.message_type.add(name="Summary")
    summ.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".t.Value", label=F.LABEL_REPEATED)
    event = fd.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".t.Summary", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    Event = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))

    ev = Event.FromString(metrics.encode_scalar_event(1.7e9, 123456789012, {"loss": 2.5, "mfu": 0.375}))
    assert ev.step == 123456789012 and ev.wall_time == 1.7e9
    assert [(v.tag, v.simple_value) for v in ev.summary.value] == [("loss", 2.5), ("mfu", 0.375)]


def test_tfevents_with_tensorboard_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    logger = metrics.MetricsLogger(tmp_path)
    _log_run(logger, range(3))
    logger.close()
    (path,) = glob.glob(str(tmp_path / "tb" / "*tfevents*"))
    events = [e for e in LegacyEventFileLoader(path).Load() if e.HasField("summary")]
    assert [e.step for e in events] == [0, 1, 2]
    assert events[2].summary.value[0].simple_value == pytest.approx(4.8)


def test_progress_line_and_plot(tmp_path):
    line = metrics.format_progress(120, {"loss": 3.14159, "tokens_per_s": 1.25e6, "mfu": 0.4123, "lr": 3e-4,
                                         "grad_norm": 0.8123, "expert_load_imbalance": 1.234})
    assert "\n" not in line
    for part in ("step     120", "loss 3.1416", "1.25M tok/s", "MFU 41.2%", "lr 3.000e-04", "gnorm 0.812",
                 "load-imb 1.23"):
        assert part in line, (part, line)
    assert "MFU n/a" in metrics.format_progress(1, {"mfu": float("nan")})
    logger = metrics.MetricsLogger(tmp_path)
    _log_run(logger, range(5))
    logger.close()
    png = metrics.plot_losses(tmp_path)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- flops
def _active_params_from_checkpoint(path, cfg):
    """Active matmul weights from the tensor shapes of a published checkpoint: every 2-D weight except the
    embedding, routed experts scaled by top_k / num_experts (all experts have the same shape)."""
    total = 0.0
    with safe_open(path, "numpy") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if len(shape) != 2 or "word_embeddings" in name:
                continue
            n = shape[0] * shape[1]
            total += n * cfg.num_experts_per_tok / cfg.num_experts if ".mlp.experts." in name else n
    return total


def test_flops_tiny_config_by_hand():
    cfg = LingConfig.from_hf(FIXTURE_DIR)
    n_ckpt = _active_params_from_checkpoint(FIXTURE_DIR / "model.safetensors", cfg)
    # By hand (hidden 64, vocab 256, 4 heads x 16): 6 Lightning attn (192+64+64)*64 = 20480 each; 2 MLA
    # q_a 32*64 + q_b 96*32 + kv_a 40*64 + kv_b 128*32 + dense 64*64 = 15872 each; dense MLP 3*96*64 = 18432;
    # 7 MoE: router 8*64 + (2 + 1 shared)*3*64*16 = 9728 each; lm_head 256*64 = 16384.
    by_hand = 6 * 20480 + 2 * 15872 + 18432 + 7 * 9728 + 16384
    assert n_ckpt == by_hand == 257536
    assert flops.active_params(cfg) == by_hand
    T = 128
    # MLA: 2*H*(qk + v)*T/2 = 2*4*(24 + 16)*64 = 20480 per layer; Lightning: 2*H*(2*16*16 + 64*(16+16)) = 20480.
    attn_fwd = 2 * 20480 + 6 * 20480
    assert flops.attention_flops_per_token(cfg, T) == attn_fwd
    assert flops.flops_per_token(cfg, T) == 6 * by_hand + 3 * attn_fwd
    assert flops.flops_per_token(cfg, T, training=False) == 2 * by_hand + attn_fwd
    assert flops.mfu(1e6, cfg, T, peak_flops=1e15, n_chips=4) == pytest.approx(1e6 * (6 * by_hand + 3 * attn_fwd) / 4e15)
    with pytest.raises(ValueError, match="n_chips"):
        flops.mfu(1.0, cfg, T, peak_flops=1e15, n_chips=0)


def test_flops_mtp_and_plain_q():
    cfg = LingConfig.from_hf(FIXTURE_DIR, num_nextn_predict_layers=1, q_lora_rank=None)
    # q_proj 64*96 = 6144 replaces q_a + q_b (2048 + 3072): MLA = 6144 + 2560 + 4096 + 4096 = 16896.
    main = 6 * 20480 + 2 * 16896 + 18432 + 7 * 9728 + 16384
    # MTP: eh_proj 2*64*64 + MLA + MoE + lm_head again on the MTP hidden state.
    mtp = 8192 + 16896 + 9728 + 16384
    assert flops.active_params(cfg, training=True) == main + mtp
    assert flops.active_params(cfg, training=False) == main
    T = 64  # MLA per layer 2*4*40*32 = 10240; the MTP layer adds one.
    assert flops.attention_flops_per_token(cfg, T) == 3 * 10240 + 6 * 20480
    assert flops.attention_flops_per_token(cfg, T, training=False) == 2 * 10240 + 6 * 20480


def test_flops_1t_like_matches_performance_model():
    """shared/docs/performance-model.md (its own script, no q_lora): 63.0B active for the assumed 1T config."""
    cfg = LingConfig(hidden_size=8192, num_hidden_layers=80, layer_group_size=8, num_attention_heads=64, head_dim=128,
                     num_experts=256, num_experts_per_tok=8, num_shared_experts=1, moe_intermediate_size=2048,
                     intermediate_size=18432, first_k_dense_replace=4, kv_lora_rank=512, q_lora_rank=None,
                     group_norm_size=8)
    assert flops.active_params(cfg) / 1e9 == pytest.approx(63.0, abs=0.05)
