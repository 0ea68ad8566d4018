"""Parity with the published reference's outputs on the tiny-a checkpoint (fp32)."""
import jax.numpy as jnp
import numpy as np

import ling
from conftest import FIXTURE_DIR

TOL = 1e-4


def test_layer_types(model, golden):
    assert [model.config.is_mla_layer(i) for i in range(8)] == golden["layer_is_mla"].tolist()


def test_logits(model, golden):
    for ids, ref in (("input_ids", "logits"), ("input_ids_long", "logits_long")):
        got = np.asarray(model(jnp.asarray(golden[ids])))
        assert got.dtype == np.float32 and got.shape == golden[ref].shape
        np.testing.assert_allclose(got, golden[ref], atol=TOL, rtol=0)


def test_hidden_states_and_router(model, golden):
    out = model.forward(jnp.asarray(golden["input_ids"]), collect=True)
    inter = out.intermediates
    np.testing.assert_allclose(inter["hidden"], golden["hidden_after_layer"], atol=TOL, rtol=0)
    np.testing.assert_allclose(inter["router_logits"], golden["router_logits"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(inter["topk_idx"], golden["router_topk_idx"])
    np.testing.assert_allclose(model.norm(jnp.asarray(golden["hidden_after_layer"][-1])), golden["final_hidden"],
                               atol=TOL, rtol=0)


def test_linear_state_after_prefill(model, golden):
    ids = jnp.asarray(golden["input_ids"])
    cache = ling.init_cache(model.config, ids.shape[0], ids.shape[1] + 1)
    cache = model.forward(ids, cache=cache).cache
    states = {i: e["state"][j] for run, e in zip(model.plan.head, cache.layers["head"]) if "state" in e
              for j, i in enumerate(run)}
    lightning = cache.layers["groups"]["lightning"]["state"]  # [groups, G-1, B, H, K, V]
    for g in range(model.plan.n_groups):
        for j in range(model.plan.group_size - 1):
            states[model.plan.group_start + g * model.plan.group_size + j] = lightning[g, j]
    for i in (0, 1, 2, 4, 5, 6):
        np.testing.assert_allclose(states[i], golden[f"linear_state_after_prefill_L{i}"], atol=TOL, rtol=0)


def test_generate(model, golden):
    new, logits = ling.generate(model, golden["input_ids"], max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(new, golden["generated"])
    np.testing.assert_allclose(logits, golden["decode_logits"], atol=TOL, rtol=0)


def test_pallas_impl_matches_golden(golden):
    """The Pallas kernels (TPU variants, interpret mode on CPU) wired into the model reproduce the reference."""
    model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, attention_impl="pallas")
    got = np.asarray(model(jnp.asarray(golden["input_ids_long"])))
    np.testing.assert_allclose(got, golden["logits_long"], atol=TOL, rtol=0)
    new = ling.generate(model, golden["input_ids"], max_new_tokens=8)
    np.testing.assert_array_equal(new, golden["generated"])
