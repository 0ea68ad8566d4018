"""Sharded execution equals one device.

For five meshes over the 8 fake CPU devices, the forward logits, the per-expert load and the gradients of a
cross-entropy loss on packed rows equal the single-device result (fp32) for the tiny-a fixture and a 16-expert,
4-group config; every parameter lands in the sharding its logical names map to; the ragged-all-to-all expert
dispatch (emulated on CPU, where XLA lacks the op) equals the same reference; a context-parallel forward over
8K tokens of packed documents equals the unsharded one.
"""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import ling
import sharding
from conftest import FIXTURE_DIR
from sharding import expert_parallel
from tiny_configs import tiny_config

generate_module = importlib.import_module("ling.generate")  # `ling.generate` names the function

# CPU compile options for these tiny programs: about 3x faster to compile, same fp32 arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}
TOL = 1e-5  # per array: max |sharded - single| <= TOL * max(1, max |single|) (fp32; summation orders differ)

MESHES = {
    "fsdp8": {"fsdp": 8},
    "data2-expert4": {"data": 2, "expert": 4},
    "fsdp2-tensor2-expert2": {"fsdp": 2, "tensor": 2, "expert": 2},
    "context8": {"context": 8},
    "data2-context4": {"data": 2, "context": 4},
}
TINY16 = tiny_config(num_hidden_layers=4, first_k_dense_replace=0, num_experts=16, n_group=4, topk_group=2,
                     num_experts_per_tok=3)


def packed_batch(vocab, b=8, t=32, seed=0):
    """ids, positions, segment ids (two documents per row, split at a different place in each row), labels."""
    ids = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
    split = 3 + 3 * np.arange(b)[:, None]
    seg = (np.arange(t)[None] >= split).astype(np.int32)
    pos = np.where(seg == 0, np.arange(t)[None], np.arange(t)[None] - split).astype(np.int32)
    return ids, jnp.asarray(pos), jnp.asarray(seg), jnp.roll(ids, -1, axis=1)


def compiled_step(model, batch):
    """(compiled fn, state): fn(state, *batch) -> (loss, logits, load, grads)."""
    graphdef, state = nnx.split(model)

    def step(state, ids, pos, seg, labels):
        def loss(s):
            out = nnx.merge(graphdef, s).forward(ids, pos, seg)
            logp = jax.nn.log_softmax(out.logits)
            return -jnp.take_along_axis(logp, labels[..., None], -1).mean(), (out.logits, out.expert_load)

        (ce, (logits, load)), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return ce, logits, load, grads

    return jax.jit(step, compiler_options=FAST_COMPILE).lower(state, *batch).compile(), state


def run(model, batch):
    fn, state = compiled_step(model, batch)
    return fn(state, *batch), fn.as_text()


def assert_close(got, want, what, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.abs(got - want).max())
    assert err <= tol * max(1.0, float(np.abs(want).max())), f"{what}: max error {err:.2e}"


def assert_matches(got, want):
    (ce, logits, load, grads), (ce0, logits0, load0, grads0) = got, want
    assert_close(logits, logits0, "logits")
    assert_close(ce, ce0, "loss")
    np.testing.assert_array_equal(load, load0)
    for (path, g0), g in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads)):
        assert_close(g, g0, "grad " + jax.tree_util.keystr(path))


def random_model(config, seed=0):
    """A LingModel of `config` with numpy-drawn weights (initialising one eagerly takes ~15 s on this CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ling.LingModel(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, var):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            value = 1.0 + 0.2 * rng.standard_normal(var.shape)
        elif "expert_bias" in name:
            value = rng.uniform(-0.1, 0.1, var.shape)
        else:
            value = 0.2 * rng.standard_normal(var.shape)
        return var.replace(jnp.asarray(value, jnp.float32))

    state = jax.tree_util.tree_map_with_path(draw, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def load_model(name, mesh=None):
    """tiny-a through from_pretrained(mesh=...), TINY16 through shard_model."""
    if name == "tiny-a":
        return ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh)
    model = random_model(TINY16)
    return model if mesh is None else sharding.shard_model(model, mesh)


_REFERENCE = {}


def reference(name):
    """Single-device (loss, logits, load, grads) of model `name` on its packed batch."""
    if name not in _REFERENCE:
        model = load_model(name)
        batch = packed_batch(model.config.vocab_size)
        _REFERENCE[name] = (batch, run(model, batch)[0])
    return _REFERENCE[name]


def assert_params_follow_rules(model, mesh):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata()["logical_axes"]
        got = var.get_value().sharding
        want = sharding.placement_spec(sharding.logical_to_spec(names, var.shape, mesh))
        assert got.mesh == mesh and got.spec == want, path


def collective_counts(hlo: str) -> dict:
    ops = ("all-gather", "reduce-scatter", "all-to-all", "collective-permute", "all-reduce")
    return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in ops}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("model_name", ["tiny-a", "tiny16"])
def test_sharded_forward_and_grads_equal_one_device(model_name, mesh_name):
    batch, want = reference(model_name)
    mesh = sharding.make_mesh(MESHES[mesh_name])
    with jax.set_mesh(mesh):
        model = load_model(model_name, mesh)
        assert_params_follow_rules(model, mesh)
        placed = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in batch]
        got, hlo = run(model, placed)
    assert_matches(got, want)
    counts = collective_counts(hlo)
    axes = MESHES[mesh_name]
    if "context" in axes:  # Lightning passes states between shards, MLA gathers the latent
        assert counts["collective-permute"] > 0 and counts["all-gather"] > 0, counts
    if "expert" in axes:  # CPU dispatch: tokens gathered, expert outputs reduce-scattered back
        assert counts["reduce-scatter"] > 0 and counts["all-gather"] > 0, counts
    if "tensor" in axes:
        assert counts["all-reduce"] > 0, counts


def test_rules_place_parameters_as_named():
    mesh = sharding.make_mesh(MESHES["fsdp2-tensor2-expert2"])
    model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh)
    st = dict(nnx.to_flat_state(nnx.state(model)))
    spec = lambda *path: st[path].get_value().sharding.spec
    fsdp = ("fsdp", "expert")  # "embed" is split over fsdp, context and expert where they are free
    assert spec("word_embeddings") == P("tensor", fsdp)  # (vocab, embed)
    assert spec("lm_head") == P(fsdp, "tensor")
    assert spec("groups", "mla", "mlp", "gate_proj") == P(None, "expert", "fsdp", "tensor")  # [groups] + (exp,...)
    assert spec("groups", "mla", "mlp", "down_proj") == P(None, "expert", "tensor", "fsdp")
    assert spec("groups", "lightning", "attention", "dense") == P(None, None, "tensor", None, fsdp)
    # Head runs (tiny-a: [dense Lightning 0], [MoE Lightning 1, 2], [MLA 3]) carry a leading [run] axis.
    assert spec("head", 0, "attention", "query_key_value") == P(None, fsdp, None, "tensor")
    assert spec("head", 2, "attention", "kv_b_proj") == P(None, fsdp, "tensor")
    assert spec("head", 1, "mlp", "expert_bias") == P()
    shard = st[("groups", "mla", "mlp", "gate_proj")].get_value().addressable_shards[0].data
    assert shard.shape == (1, 8 // 2, 64 // 2, 16 // 2)
    # Overrides replace entries; a dim that its axes do not divide stays whole; a mesh axis is used once.
    with sharding.use_rules({"embed": None, "exp": ["expert", "fsdp"], "mlp": None}):
        specs = dict(nnx.to_flat_state(sharding.param_specs(nnx.state(model), mesh)))
        assert specs[("groups", "mla", "mlp", "gate_proj")].get_value() == P(None, ("expert", "fsdp"))
    assert sharding.logical_to_spec(("heads",), (3,), mesh) == P(None)
    assert sharding.logical_to_spec(("batch", "embed"), (4, 8), mesh) == P(("fsdp", "expert"), None)
    assert sharding.logical_to_spec(("batch", "embed"), (2, 8), mesh) == P("fsdp", "expert")
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("embedd",), (4,), mesh)
    with pytest.raises(ValueError, match="not a mesh axis"):
        sharding.make_rules({"embed": "model"})


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    for bad, match in (({"fsdp": 3}, "multiply"), ({"fsdp": -1, "data": -1}, "at most one"),
                       ({"model": 8}, "unknown")):
        with pytest.raises(ValueError, match=match):
            sharding.make_mesh(bad)
    with pytest.raises(ValueError, match="may span slices"):
        sharding.make_mesh({"fsdp": -1}, dcn_axes={"expert": 2})
    abstract = sharding.make_abstract_mesh({"fsdp": -1, "expert": 64}, 1024)
    assert dict(abstract.shape)["fsdp"] == 16


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """lax.ragged_all_to_all's semantics from all_gather + scatter (XLA:CPU has no ragged-all-to-all)."""
    me = lax.axis_index(axis_name)
    rows_pnd = lax.all_gather(operand, axis_name)
    start, size, dest = (lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes, output_offsets))
    j = jnp.arange(operand.shape[0])
    src = rows_pnd[jnp.arange(rows_pnd.shape[0])[:, None], jnp.minimum(start[:, None] + j, operand.shape[0] - 1)]
    to = jnp.where(j < size[:, None], dest[:, None] + j, output.shape[0])
    return output.at[to.reshape(-1)].set(src.reshape(-1, *operand.shape[1:]), mode="drop")


@pytest.mark.parametrize("mesh_name", ["data2-expert4", "fsdp2-tensor2-expert2"])
def test_ragged_expert_dispatch_equals_one_device(mesh_name, monkeypatch):
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(expert_parallel, "dispatch_kind", lambda: "ragged")
    batch, want = reference("tiny16")
    mesh = sharding.make_mesh(MESHES[mesh_name])
    with jax.set_mesh(mesh):
        model = load_model("tiny16", mesh)
        got, _ = run(model, [jax.device_put(a, sharding.batch_sharding(mesh)) for a in batch])
    assert_matches(got, want)


def test_zigzag_token_order():
    from sharding import context_parallel as cp
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    with jax.set_mesh(mesh):
        assert (cp.zigzag_shards((2, 32)), cp.zigzag_shards((2, 20)), cp.zigzag_shards((2, 4))) == (4, 0, 0)
        x = jax.device_put(jnp.broadcast_to(jnp.arange(32), (2, 32)), sharding.batch_sharding(mesh))
        z = jax.jit(cp.to_zigzag)(x)
        back = jax.jit(cp.from_zigzag)(z)
    chunks = [0, 7, 1, 6, 2, 5, 3, 4]  # shard j holds chunks j and 2n-1-j of 4 tokens
    np.testing.assert_array_equal(np.asarray(z)[1], np.concatenate([np.arange(4) + 4 * c for c in chunks]))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_zigzag_forward_with_mtp_heads():
    """Hidden states return to sequence order before the LM head and each MTP head (MTP inputs are shifted in
    sequence order, then moved into zig-zag order with the main tokens)."""
    model = random_model(tiny_config(num_nextn_predict_layers=2))
    ids = jax.random.randint(jax.random.key(3), (2, 32), 0, model.config.vocab_size)
    fwd = jax.jit(lambda m, x: m(x, return_mtp_logits=True), compiler_options=FAST_COMPILE)
    want = fwd(model, ids)
    mesh = sharding.make_mesh(MESHES["data2-context4"])
    with jax.set_mesh(mesh):
        got = fwd(sharding.shard_model(model, mesh), jax.device_put(ids, sharding.batch_sharding(mesh)))
    assert_close(got[0], want[0], "logits")
    for j, (a, b) in enumerate(zip(got[1], want[1])):
        assert_close(a, b, f"mtp logits {j}")


def test_context_parallel_contiguous_order():
    """T = 24 over 8 context shards: 2n does not divide T, so each shard holds one contiguous chunk (the MLA
    queries attend at a per-shard causal offset, the Lightning chain runs up the shards only)."""
    model = load_model("tiny-a")
    batch = packed_batch(model.config.vocab_size, b=2, t=24)
    want, _ = run(model, batch)
    mesh = sharding.make_mesh({"context": 8})
    with jax.set_mesh(mesh):
        model = load_model("tiny-a", mesh)
        got, _ = run(model, [jax.device_put(a, sharding.batch_sharding(mesh)) for a in batch])
    assert_matches(got, want)


def test_context_parallel_with_pallas_kernels():
    """The TPU kernels (interpreted) inside the islands, zig-zag order over data2 x context4: the MLA kernel gets
    each query piece's traced causal offset; logits, loss, load and gradients equal the single-device run."""
    batch, want = reference("tiny-a")
    mesh = sharding.make_mesh(MESHES["data2-context4"])
    with jax.set_mesh(mesh):
        model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh, attention_impl="pallas")
        got, _ = run(model, [jax.device_put(a, sharding.batch_sharding(mesh)) for a in batch])
    assert_matches(got, want)


def test_context_parallel_8k_packed_documents():
    c = tiny_config(num_hidden_layers=4, first_k_dense_replace=0, hidden_size=16, num_attention_heads=2, head_dim=8,
                    num_experts=4, n_group=2, topk_group=1, max_position_embeddings=8192)
    model = random_model(c, seed=1)
    t = 8192
    # Documents crossing shard boundaries (every 1024 tokens), a one-token document, one spanning three shards.
    starts = np.array([0, 700, 1030, 1031, 2047, 2048, 2049, 5000, 8000])
    seg = np.searchsorted(starts, np.arange(t), side="right")[None].astype(np.int32)
    pos = (np.arange(t) - starts[seg[0] - 1])[None].astype(np.int32)
    ids = jax.random.randint(jax.random.key(2), (1, t), 0, c.vocab_size)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s).forward(*a).logits, compiler_options=FAST_COMPILE)
    want = fwd(state, ids, pos, seg)
    mesh = sharding.make_mesh({"context": 8})
    with jax.set_mesh(mesh):
        sharding.shard_model(model, mesh)
        graphdef, state = nnx.split(model)
        got = fwd(state, *(jax.device_put(a, sharding.batch_sharding(mesh)) for a in (ids, pos, seg)))
    assert got.sharding.spec[1] == "context"
    # Over 8K tokens either path's fp32 logits are ~2e-5 from a float64 run (measured), so allow 5e-5.
    assert_close(got, want, "8K logits", tol=5e-5)


def test_generate_under_mesh_matches_golden():
    """Cached prefill split over context (Lightning state carried in and out of the island), decode with a batch
    of 2 padded to the 4 expert shards, paged MLA cache under GSPMD: the reference's greedy tokens and logits, with
    the prefill and the decode step compiled once each (the cache keeps one layout between them)."""
    golden = dict(np.load(FIXTURE_DIR / "golden.npz"))
    mesh = sharding.make_mesh({"expert": 4, "context": 2})
    steps = (generate_module._prefill, generate_module._decode)
    for step in steps:
        step.clear_cache()
    with jax.set_mesh(mesh):
        model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh)
        new, logits = ling.generate(model, golden["input_ids"], max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(new, golden["generated"])
    np.testing.assert_allclose(logits, golden["decode_logits"], atol=1e-4, rtol=0)
    assert [step._cache_size() for step in steps] == [1, 1]


@pytest.mark.parametrize("name", ["tiny-a", "odd-heads"])
def test_one_row_per_data_shard_matches_golden(name):
    """The fixture's 2 x 40 tokens on data2·tensor2·context2: one row per data shard, the sequence split over
    context, the hidden dim over tensor. The MoE layers inside the layer scan once gave wrong logits here (tokens
    flattened across the split batch and length dims outside the expert island)."""
    path = FIXTURE_DIR.parent / name
    golden = dict(np.load(path / "golden.npz"))
    mesh = sharding.make_mesh({"data": 2, "tensor": 2, "context": 2})
    with jax.set_mesh(mesh):
        model = ling.from_pretrained(path, dtype=jnp.float32, mesh=mesh)
        logits = model(jnp.asarray(golden["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4, rtol=0)


def test_moe_in_a_layer_scan_with_padded_decode_rows():
    """A stacked MoE run scanned over 2 decode rows on data2·fsdp2·tensor2: the expert island pads the rows to the 4
    batch shards, and its sliced output plus the shared expert's partial sums once came out wrong in the scan."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, 64)), jnp.float32)

    def run(mlps, x):
        graphdef, state = nnx.split(mlps)
        return jax.lax.scan(lambda x, s: (x + nnx.merge(graphdef, s)(x)[0], None), x, state)[0]

    want = jax.jit(run)(ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32).head[1].mlp, x)
    with jax.set_mesh(mesh):
        mlps = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh).head[1].mlp
        got = jax.jit(run)(mlps, jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor"))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "tensor": 2, "expert": 2}])
def test_generate_with_the_hidden_dim_split(axes):
    """Two rows over four batch shards, the residual stream's hidden dim over tensor in prefill and decode: the
    expert island pads the rows, which once gave row 1 wrong tokens from the first decode step's MoE layer on."""
    golden = dict(np.load(FIXTURE_DIR / "golden.npz"))
    mesh = sharding.make_mesh(axes)
    with jax.set_mesh(mesh):
        model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh)
        new, logits = ling.generate(model, golden["input_ids"], max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(new, golden["generated"])
    np.testing.assert_allclose(logits, golden["decode_logits"], atol=1e-4, rtol=0)


def test_generate_with_pallas_kernels_in_islands():
    """Interpreted TPU kernels under data2 x tensor2 x context2: cached prefill split over context (each shard's
    queries at their offset in the cache window), decode with rows over data and heads over tensor."""
    golden = dict(np.load(FIXTURE_DIR / "golden.npz"))
    mesh = sharding.make_mesh({"data": 2, "tensor": 2, "context": 2})
    with jax.set_mesh(mesh):
        model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh, attention_impl="pallas")
        new, logits = ling.generate(model, golden["input_ids"], max_new_tokens=4, return_logits=True)
    np.testing.assert_array_equal(new, golden["generated"][:, :4])
    np.testing.assert_allclose(logits, golden["decode_logits"][:, :4], atol=1e-4, rtol=0)


def test_planner(capsys):
    from sharding import plan

    assert plan.parse_topology("v5p-1024") == ("v5p", 512, 1)  # v5p names count TensorCores, 2 per chip
    assert plan.parse_topology("4xv6e-256") == ("v6e", 1024, 4)
    assert plan.parse_topology("h200-64") == ("h200", 64, 1)
    with pytest.raises(ValueError, match="units per chip"):
        plan.parse_topology("v5p-7")
    # Parameter bytes on an abstract fsdp=4 mesh, counted independently from the logical names: a tensor is split
    # 4 ways when it has a dim named embed / q_latent / kv_latent divisible by 4, else kept whole.
    config = ling.LingConfig.from_hf(FIXTURE_DIR)
    params = nnx.state(nnx.eval_shape(lambda: ling.LingModel(config, rngs=nnx.Rngs(0))), nnx.Param)
    want = 0
    for _, var in nnx.to_flat_state(params):
        names = var.get_metadata()["logical_axes"]
        dims = var.shape[var.ndim - len(names):]
        split = any(n in ("embed", "q_latent", "kv_latent") and d % 4 == 0 for n, d in zip(names, dims))
        want += 4 * var.size // (4 if split else 1)
    got = plan.state_bytes(config, 4, 1, 1)
    assert got["params"] == got["grads"] == want
    assert 0 <= got["optimizer"] - 2 * want <= 16  # Adam's m and v, plus the step counters
    plan.main(["--config", "configs/ling-2.5-1t.yaml", "--topology", "v5p-1024", "--json"])
    report = json.loads(capsys.readouterr().out)
    state = sum(report["bytes"][k] for k in ("params", "grads", "optimizer"))
    assert report["chips"] == 512 and report["fits"]
    assert abs(state - 16 * 1012.9e9 / 512) < 0.05 * state  # 16 B/param over 512 chips (performance-model.md)
