"""Serving: the continuous-batching engine against the published reference's outputs, batching and chunking
invariances, a long-context prefill against a full forward pass, bad input, the memory plan, and the CLI."""
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ling
import sharding
from conftest import FIXTURE_DIR
from ling.config import LingConfig, load_yaml_config
from ling.model import LingModel
from ling.serving import Engine, EngineConfig, Limits, Request, RequestError, parse_line, parse_request
from ling.serving import engine as engine_module
from ling.serving.engine import prefill_pieces
from ling.serving.plan import memory_plan, parse_mesh
from tiny_configs import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
# Shared by the fixture tests so they reuse compiled shapes: 40-token prompts run as pieces 8 + 16 + 16. The pool
# (12 usable pages) holds two 40-token sequences at once, but not always a third request's pages as well.
ENGINE = EngineConfig(max_slots=2, max_len=64, page_size=8, prefill_chunk=16, num_pages=13)
# 128K tokens take ~5 min for the engine plus ~4 min for the reference forward on a 2-core CPU (docs/serving.md).
LONG_TOKENS = int(os.environ.get("LING_SERVE_LONG_TOKENS", 16384))


def _request(rid, ids, **kw):
    return Request(id=rid, prompt_ids=tuple(int(i) for i in ids), **{"max_new_tokens": 8, **kw})


def test_greedy_matches_reference(model, golden):
    """Both fixture prompts decoded together reproduce the reference's greedy tokens and logits; the first token's
    logits come from the chunked prefill (pieces 8 + 16 + 16), the rest from decode steps."""
    engine = Engine(model, ENGINE, keep_logits=True)
    done = {f.request.id: f for f in engine.run([_request(b, golden["input_ids"][b]) for b in range(2)])}
    for b in range(2):
        assert done[b].finish_reason == "length"
        np.testing.assert_array_equal(done[b].token_ids, golden["generated"][b])
        np.testing.assert_allclose(done[b].logits, golden["decode_logits"][b], atol=TOL, rtol=0)
        np.testing.assert_allclose(done[b].logits[0], golden["logits"][b, -1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["odd-heads", "group8-all-moe"])
def test_greedy_matches_reference_on_other_layouts(name):
    """The engine's paged cache on stacks unlike tiny-a's: MLA runs in the tail after a trailing incomplete group
    (odd-heads) and groups of 8 with no head at all (group8-all-moe)."""
    path = FIXTURE_DIR.parent / name
    golden = np.load(path / "golden.npz")
    engine = Engine(ling.from_pretrained(path, dtype=jnp.float32), ENGINE, keep_logits=True)
    done = {f.request.id: f for f in engine.run([_request(b, golden["input_ids"][b]) for b in range(2)])}
    for b in range(2):
        np.testing.assert_array_equal(done[b].token_ids, golden["generated"][b])
        np.testing.assert_allclose(done[b].logits, golden["decode_logits"][b], atol=TOL, rtol=0)


def test_continuous_batching_equals_running_alone(model, golden):
    """Five requests through two slots (slots and pages reused while another slot decodes) give each request the
    tokens it gets alone, greedy and sampled alike; every page returns to the free list."""
    ids = golden["input_ids"]
    requests = [_request("a", ids[0]), _request("b", ids[1][:24], max_new_tokens=2),
                _request("c", ids[1][16:], max_new_tokens=5, temperature=0.9, top_k=20, top_p=0.9, seed=7),
                _request("d", ids[0][:8], max_new_tokens=3, temperature=1.3, seed=11),
                _request("e", ids[1], max_new_tokens=4)]
    engine = Engine(model, ENGINE)
    batched = {f.request.id: f.token_ids for f in engine.run(requests)}
    assert engine.stats["finished"] == 5 and len(engine._free_pages) == ENGINE.pool_pages() - 1
    for r in requests:
        alone, = Engine(model, ENGINE).run([r])
        assert alone.token_ids == batched[r.id], r.id
        assert len(alone.token_ids) == r.max_new_tokens
    np.testing.assert_array_equal(batched["a"], golden["generated"][0])


def test_prefill_pieces_bound_compiled_shapes():
    for n in (1, 7, 16, 40, 1000, 4097):
        pieces = prefill_pieces(n, 256)
        rem = [p for p in pieces if p < 256]
        assert sum(pieces) == n and all(p & (p - 1) == 0 for p in pieces)
        assert rem == sorted(set(rem), reverse=True) and pieces[len(rem):] == [256] * (n // 256)
    assert prefill_pieces(40, 16) == [8, 16, 16]


@pytest.mark.parametrize("mesh_axes", [None, {"data": 2, "tensor": 2, "expert": 2}])
def test_each_step_shape_compiles_once(golden, mesh_axes, monkeypatch):
    """One compiled program per decode bucket and per prefill (piece length, page width), however the cache got to
    its state (page-table updates between steps, earlier steps' outputs): the engine keeps its layout fixed."""
    mesh = sharding.make_mesh(mesh_axes) if mesh_axes else None
    model = ling.from_pretrained(FIXTURE_DIR, dtype=jnp.float32, mesh=mesh)
    decode, prefill = engine_module._decode_step, engine_module._prefill_piece
    decode.clear_cache()
    prefill.clear_cache()
    buckets, pieces = set(), set()

    def decode_spy(*args, bucket):
        buckets.add(bucket)
        return decode(*args, bucket=bucket)

    def prefill_spy(*args, width):
        pieces.add((args[-1].shape, width))
        return prefill(*args, width=width)

    monkeypatch.setattr(engine_module, "_decode_step", decode_spy)
    monkeypatch.setattr(engine_module, "_prefill_piece", prefill_spy)
    ids = golden["input_ids"]
    requests = [_request("a", ids[0]), _request("b", ids[1][:20], max_new_tokens=12), _request("c", ids[0][:9])]
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
        done = list(Engine(model, ENGINE).run(requests))
    assert sorted(f.request.id for f in done if f.error is None) == ["a", "b", "c"]
    assert len(buckets) == 2 and decode._cache_size() == len(buckets)
    assert len(pieces) > 2 and prefill._cache_size() == len(pieces)


def test_long_context_chunked_prefill_equals_full_forward():
    """A tiny hybrid model (hidden 32, 2 heads, one Lightning + one MLA layer) prefills LONG_TOKENS - 1023 tokens in
    chunks of 2048 and decodes; the logits of every generated token equal a full forward pass over the same tokens."""
    n = LONG_TOKENS
    c = LingConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, layer_group_size=2, group_norm_size=2, num_experts=2,
                   num_experts_per_tok=1, n_group=1, topk_group=1, moe_intermediate_size=8, first_k_dense_replace=2,
                   kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                   max_position_embeddings=n + 64, rope_theta=10000.0, initializer_range=0.2,
                   attention_impl="reference", eos_token_id=None, pad_token_id=None)
    assert [c.is_mla_layer(i) for i in range(2)] == [False, True]
    m = LingModel(c, rngs=nnx.Rngs(0))
    # Pieces 1024 + 1 (a one-token piece takes the decode path) + full chunks: few compiled shapes.
    ids = np.random.default_rng(0).integers(0, c.vocab_size, n - 1024 + 1)
    engine = Engine(m, EngineConfig(max_slots=1, max_len=n, page_size=256, prefill_chunk=2048), keep_logits=True)
    done, = engine.run([_request(0, ids, max_new_tokens=4)])
    full = m(jnp.asarray(np.concatenate([ids, done.token_ids[:-1]])[None], jnp.int32))
    np.testing.assert_allclose(done.logits, np.asarray(full[0, len(ids) - 1:]), atol=TOL, rtol=0)
    np.testing.assert_array_equal(done.token_ids, np.asarray(full[0, len(ids) - 1:]).argmax(-1))


LIMITS = Limits(vocab_size=256, max_len=64)


@pytest.mark.parametrize("record, message", [
    ({"prompt_ids": []}, "prompt is empty"),
    ({"prompt": ""}, "needs a tokenizer"),
    ({"prompt_ids": [1, 256]}, "outside the vocabulary"),
    ({"prompt_ids": [-1]}, "outside the vocabulary"),
    ({"prompt_ids": [1.5]}, "list of integer token ids"),
    ({"prompt_ids": list(range(60)), "max_new_tokens": 5}, "exceeds the maximum sequence length 64"),
    ({"prompt_ids": [1], "max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"prompt_ids": [1], "temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"prompt_ids": [1], "temperature": "hot"}, "temperature must be a finite number"),
    ({"prompt_ids": [1], "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"prompt_ids": [1], "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt_ids": [1], "top_k": -1}, "top_k must be >= 0"),
    ({"prompt_ids": [1], "seed": 2**40}, "seed must be in"),
    ({"prompt_ids": [1], "stop": [[]]}, "stop entries"),
    ({"prompt_ids": [1], "stop": [999]}, "outside the vocabulary"),
    ({"prompt_ids": [1], "max_tokens": 5}, "unknown field"),
    ({"prompt_ids": [1], "prompt": "x"}, "exactly one of"),
    ({"prompt_ids": [1], "chat": True}, "chat templates"),
])
def test_bad_request_is_rejected(record, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request({"id": 1, "max_new_tokens": 4, **record}, LIMITS)
    rec = parse_line(json.dumps({"id": "x", "max_new_tokens": 4, **record}), 3, LIMITS)
    assert rec["id"] == "x" and message.split()[0] in rec["error"]


def test_malformed_line_and_engine_errors_leave_others_complete(model, golden):
    rec = parse_line('{"id": 1, "prompt_ids": [1, 2', 5, LIMITS)
    assert rec["id"] is None and rec["line"] == 5 and "invalid JSON" in rec["error"]
    assert "JSON object" in parse_line("[1, 2]", 6, LIMITS)["error"]
    small_pool = Engine(model, EngineConfig(max_slots=2, max_len=64, page_size=8, num_pages=7))
    with pytest.raises(RequestError, match="needs 7 cache pages of 8 tokens; the pool has 6"):
        small_pool.check(_request("big", golden["input_ids"][0], max_new_tokens=17))
    # Invalid requests inside a run get error results; the others are served around them.
    ids = golden["input_ids"]
    reqs = [_request("big", ids[0], max_new_tokens=25), _request("ok", ids[0]), Request("empty", (), 4),
            _request("vocab", [1, 300]), _request("ok2", ids[1][:24], max_new_tokens=2)]
    done = {f.request.id: f for f in Engine(model, ENGINE).run(reqs)}
    assert "exceeds the maximum sequence length 64" in done["big"].error and "empty" in done["empty"].error
    assert "outside the vocabulary" in done["vocab"].error
    np.testing.assert_array_equal(done["ok"].token_ids, golden["generated"][0])
    assert done["ok2"].finish_reason == "length" and done["ok2"].error is None


def test_plan_matches_hand_calculation():
    c = load_yaml_config(REPO / "configs" / "ling-2.5-1t.yaml")
    plan = memory_plan(c, 1 << 20, mesh=parse_mesh("tensor=8,expert=8"), device_bytes=95 * 2**30)
    assert plan.n_mla == 10 and plan.n_lightning == 70
    assert plan.latent_per_seq == 10 * 576 * 2 * 2**20 == plan.latent_per_device  # 11.25 GiB, not split by heads
    assert plan.state_per_seq == 70 * 64 * 128 * 128 * 4 and plan.state_per_device == plan.state_per_seq // 8
    # Weights of a small config counted by hand from the architecture (bf16 params, fp32 expert bias).
    t = tiny_config(num_nextn_predict_layers=0)
    d, h, hd, v, e, f = t.hidden_size, t.num_attention_heads, t.head_dim, t.vocab_size, t.num_experts, \
        t.moe_intermediate_size
    lightning = 3 * d * h * hd + 2 * hd + d * h * hd + h * hd + h * hd * d
    mla = (d * t.q_lora_rank + t.q_lora_rank + t.q_lora_rank * h * t.qk_head_dim
           + d * (t.kv_lora_rank + t.qk_rope_head_dim) + t.kv_lora_rank
           + t.kv_lora_rank * h * (t.qk_nope_head_dim + t.v_head_dim) + h * t.v_head_dim * d)
    routed = 3 * e * d * f
    moe = d * e + routed + 3 * d * f * t.num_shared_experts
    layers = [(mla if t.is_mla_layer(i) else lightning) + 2 * d
              + (moe if t.is_moe_layer(i) else 3 * d * t.intermediate_size) for i in range(t.num_hidden_layers)]
    n_moe = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    params = 2 * v * d + d + sum(layers)
    small = memory_plan(t, 100, mesh={"expert": 4}, page_size=16, device_bytes=2**30)
    assert small.weights_total == 2 * params + 4 * e * n_moe
    # Over expert=4 every weight with an embed / latent / expert dim is split 4 ways (embed -> fsdp, context, expert);
    # only the Lightning QK-norm and g_norm weights (head_dim, heads_merged) and the fp32 expert bias stay whole.
    n_lin = sum(not t.is_mla_layer(i) for i in range(t.num_hidden_layers))
    whole = 2 * n_lin * (2 * hd + h * hd) + 4 * e * n_moe
    assert small.weights_per_device == (small.weights_total - whole) // 4 + whole
    assert small.latent_per_seq == 2 * 112 * (t.kv_lora_rank + t.qk_rope_head_dim) * 2  # 100 tokens -> 7 pages
    assert small.fits and not memory_plan(t, 100, device_bytes=2**10).fits


def test_plan_cli_json():
    out = subprocess.run([sys.executable, "serve.py", "--plan", "--config", "configs/ling-2.5-1t.yaml", "--context",
                          "1048576", "--mesh", "tensor=8,expert=8", "--device-gib", "141", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] and plan["devices"] == 64 and plan["latent_per_seq"] == 12079595520


def _byte_tokenizer(path):
    """A 256-token byte-level BPE without merges: every text round-trips and every id fits tiny-a's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return tok


def test_cli_end_to_end(tmp_path, golden):
    """JSONL in, JSONL out in input order, on a 4-device (tensor 2 x expert 2) CPU mesh: good requests complete
    (greedy = the reference), each bad line gets its error record."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt / name).symlink_to(FIXTURE_DIR / name)
    tok = _byte_tokenizer(ckpt / "tokenizer.json")
    text = "The quick brown fox jumps over a lazy dog"[:40]  # 40 tokens: the same compiled shapes as g0
    lines = [json.dumps({"id": "g0", "prompt_ids": golden["input_ids"][0].tolist(), "max_new_tokens": 8}),
             "{broken",
             json.dumps({"id": "txt", "prompt": text, "max_new_tokens": 6}),
             json.dumps({"id": "empty", "prompt": ""}),
             json.dumps({"id": "long", "prompt_ids": [3] * 200}),
             json.dumps({"id": "g1", "prompt_ids": golden["input_ids"][1].tolist(), "stop": [[231, 242]]}),
             json.dumps({"id": "vocab", "prompt_ids": [5, 256]}),
             json.dumps({"id": "txt_ids", "prompt_ids": tok.encode(text).ids, "max_new_tokens": 6})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "serve.py", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in.jsonl"),
                          "--output", str(tmp_path / "out.jsonl"), "--max-slots", "2", "--page-size", "8",
                          "--prefill-chunk", "64", "--max-new-tokens", "8", "--mesh", "tensor=2,expert=2",
                          "--compilation-cache-dir", str(tmp_path / "xla")],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu",
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr
    assert "4/4 requests done" in out.stderr
    recs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["g0", None, "txt", "empty", "long", "g1", "vocab", "txt_ids"]
    assert recs[0]["token_ids"] == golden["generated"][0].tolist() and recs[0]["finish_reason"] == "length"
    assert recs[0]["text"] == tok.decode(golden["generated"][0].tolist())
    assert recs[1]["line"] == 2 and "invalid JSON" in recs[1]["error"]
    # The text prompt was tokenised with the checkpoint's tokenizer.json: same tokens as its ids sent directly.
    assert recs[2]["token_ids"] == recs[7]["token_ids"] and len(recs[2]["token_ids"]) == 6
    assert recs[2]["text"] == tok.decode(recs[2]["token_ids"]) and recs[2]["finish_reason"] == "length"
    assert "empty" in recs[3]["error"] and "exceeds the maximum sequence length 128" in recs[4]["error"]
    assert recs[5]["token_ids"] == golden["generated"][1][:5].tolist() and recs[5]["finish_reason"] == "stop"
    assert "outside the vocabulary" in recs[6]["error"]
    assert os.listdir(tmp_path / "xla")  # the compiled engine steps were kept for the next run
