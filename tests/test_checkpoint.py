"""Published-format checkpoints: round trips (one file and sharded, fp32 and bf16) and clear errors."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import ling
from conftest import FIXTURE_DIR
from tiny_configs import tiny_config


def state_arrays(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_round_trip_is_bit_exact(tmp_path):
    model = ling.from_pretrained(FIXTURE_DIR)
    ling.save_pretrained(model, tmp_path / "one")
    reference = load_file(str(FIXTURE_DIR / "model.safetensors"))
    written = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(written) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(written[name], reference[name], err_msg=name)
    ling.save_pretrained(model, tmp_path / "sharded", shard_size=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = ling.from_pretrained(tmp_path / "sharded")
    for k, v in state_arrays(model).items():
        np.testing.assert_array_equal(state_arrays(again)[k], v)


def test_mtp_bf16_checkpoint_upcasts_exactly(tmp_path):
    c = tiny_config(num_nextn_predict_layers=1, use_qkv_bias=True, use_bias=True, tie_word_embeddings=True)
    model = ling.LingModel(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    ling.save_pretrained(model, tmp_path / "bf16", shard_size=100_000)
    names = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"model.layers.{c.num_hidden_layers}.eh_proj.weight" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names and "lm_head.weight" not in names
    loaded_bf16 = ling.from_pretrained(tmp_path / "bf16")
    loaded_f32 = ling.from_pretrained(tmp_path / "bf16", dtype=jnp.float32)
    for k, v in state_arrays(model).items():
        np.testing.assert_array_equal(state_arrays(loaded_bf16)[k], v)
        np.testing.assert_array_equal(state_arrays(loaded_f32)[k], v.astype(np.float32))
    assert loaded_f32.dtype == jnp.float32


def test_mtp_layer_in_its_own_file_outside_the_index(tmp_path):
    """Ling-2.6-flash ships its MTP layer as model-mtp-layer.safetensors; the index may not name it."""
    src = FIXTURE_DIR.parent / "mtp2"
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    tensors = load_file(str(src / "model.safetensors"))
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    is_mtp = lambda name: name.startswith("model.layers.") and int(name.split(".")[2]) >= n
    save_file({k: v for k, v in tensors.items() if not is_mtp(k)}, str(d / "model-00001-of-00001.safetensors"))
    save_file({k: v for k, v in tensors.items() if is_mtp(k)}, str(d / "model-mtp-layer.safetensors"))
    weight_map = {k: "model-00001-of-00001.safetensors" for k in tensors if not is_mtp(k)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got, want = ling.from_pretrained(d), ling.from_pretrained(src)
    assert len(got.mtp) == 2
    for k, v in state_arrays(want).items():
        np.testing.assert_array_equal(state_arrays(got)[k], v)


@pytest.fixture
def broken(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE_DIR, d, ignore=shutil.ignore_patterns("golden.npz", "README.md"))
    return d


def rewrite(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_error_lists_every_bad_tensor(broken):
    def edit(t):
        del t["model.layers.3.attention.kv_b_proj.weight"]
        t["model.layers.1.attention.extra.weight"] = np.zeros(3, np.float32)
        t["model.layers.5.mlp.experts.2.up_proj.weight"] = np.zeros((16, 65), np.float32)
    rewrite(broken, edit)
    with pytest.raises(ValueError) as e:
        ling.from_pretrained(broken)
    msg = str(e.value)
    assert "missing tensor model.layers.3.attention.kv_b_proj.weight (expected shape [128, 32])" in msg
    assert "unexpected tensor model.layers.1.attention.extra.weight" in msg
    assert "model.layers.5.mlp.experts.2.up_proj.weight: expected shape [16, 64], found [16, 65]" in msg


def test_truncated_file_and_missing_shard(broken, tmp_path):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        ling.from_pretrained(broken)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        ling.from_pretrained(broken)


def test_tensor_in_two_files_is_an_error(broken):
    """Without an index, a stray file holding some of the same names must not silently replace weights."""
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(broken / "extra.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight is in both"):
        ling.from_pretrained(broken)


def test_interrupted_save_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    model = ling.from_pretrained(FIXTURE_DIR)
    target = tmp_path / "ckpt"
    ling.save_pretrained(model, target)
    before = (target / "model.safetensors").read_bytes()
    import ling.checkpoint.hf as hf

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(hf, "save_file", fail)
    with pytest.raises(OSError):
        ling.save_pretrained(model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
