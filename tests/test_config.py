"""LingConfig: published config.json round trip, layer-type rule, validation, YAML presets."""
import json
import math
import pathlib

import numpy as np
import pytest

from conftest import FIXTURE_DIR
from ling.config import LingConfig, RopeScaling, load_yaml_config, slopes_for_heads
from ling.layers.rope import mla_softmax_scale, rope_frequencies
from tiny_configs import tiny_config

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def test_from_hf_to_hf_round_trip():
    published = json.loads((FIXTURE_DIR / "config.json").read_text())
    c = LingConfig.from_hf(FIXTURE_DIR)
    assert c.q_lora_rank == 32 and c.layer_group_size == 4 and c.rope_scaling is None
    d = c.to_hf()
    assert d["model_type"] == "bailing_hybrid" and d["architectures"] == ["BailingMoeV2_5ForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "kv_lora_rank", "qk_head_dim", "n_group", "eos_token_id",
                "group_norm_size", "first_k_dense_replace", "rope_theta", "q_lora_rank"):
        assert d[key] == published[key], key
    assert LingConfig.from_hf(d) == c
    yarn = c.replace(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32, mscale_all_dim=1.0))
    assert LingConfig.from_hf(json.loads(json.dumps(yarn.to_hf()))) == yarn


def test_layer_type_rule_with_trailing_group():
    c = tiny_config(num_hidden_layers=10, layer_group_size=4)
    # groups [0-3], [4-7] end in MLA; 8, 9 form an incomplete group: all MLA.
    assert [i for i in range(10) if c.is_mla_layer(i)] == [3, 7, 8, 9]
    assert c.is_mla_layer(10)  # MTP layers are MLA
    c80 = tiny_config(num_hidden_layers=80, layer_group_size=8)
    assert [i for i in range(80) if c80.is_mla_layer(i)] == list(range(7, 80, 8))


@pytest.mark.parametrize("change, message", [
    (dict(partial_rotary_factor=0.25), "qk_rope_head_dim"),
    (dict(num_experts=9), "divisible by n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(group_norm_size=3), "group_norm_size"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_impl="cuda"), "attention_impl"),
    (dict(num_experts=None, num_nextn_predict_layers=1), "MTP layers are always MoE"),
])
def test_validation_errors(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**change)


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        LingConfig.from_hf({"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        LingConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LingConfig.from_hf(tmp_path)


def test_alibi_slopes_non_power_of_two():
    def power(n):
        s = 2 ** (-8 / n)
        return [s ** (i + 1) for i in range(n)]
    assert np.allclose(slopes_for_heads(8), power(8))
    assert np.allclose(slopes_for_heads(6), power(4) + power(8)[0::2][:2])
    assert np.allclose(slopes_for_heads(12), power(8) + power(16)[0::2][:4])


def test_yarn_frequencies_independent():
    c = tiny_config(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64, beta_fast=32,
                                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                    head_dim=16, qk_rope_head_dim=8)
    dim, base = 8, 10000.0
    inv = 1 / base ** (np.arange(0, dim, 2) / dim)
    corr = lambda r: dim * math.log(64 / (r * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    expected = inv / 8 * ramp + inv * (1 - ramp)
    got, scaling = rope_frequencies(c)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert scaling == pytest.approx(1.0)  # mscale == mscale_all_dim
    m = 0.1 * math.log(8) + 1
    assert mla_softmax_scale(c) == pytest.approx(c.qk_head_dim ** -0.5 * m * m)
    plain = tiny_config(rope_scaling=RopeScaling(factor=8.0), head_dim=16, qk_rope_head_dim=8)
    assert rope_frequencies(plain)[1] == pytest.approx(m)


@pytest.mark.parametrize("name", ["ling-2.5-1t.yaml", "ling-2.6-flash.yaml", "tiny.yaml"])
def test_presets_load(name):
    c = load_yaml_config(CONFIGS / name)
    assert c.to_hf()["model_type"] == "bailing_hybrid"
