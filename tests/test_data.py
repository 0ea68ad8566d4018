"""Tests for trainer.data / trainer.tokenizer / trainer.corpus (CPU, a few seconds)."""
import json
import os

import numpy as np
import pytest

from trainer import corpus, data, tokenizer as tokenizer_lib

EOS, PAD = 99, 98
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Packing keeps documents apart.",
         "héllo wörld ✓ — unicode survives byte-level BPE", "a", "",
         "Lorem ipsum " * 30, "def f(x):\n    return x + 1\n"] * 3
KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _write_arrayrecord(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(json.dumps(r).encode())
    writer.close()
    return str(path)


def _ids_config(path, **kw):
    kw = {"seq_len": 8, "global_batch_size": 2, "eos_id": EOS, "pad_id": PAD, **kw}
    return data.DataConfig(paths=path, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _expected_rows(layout, seq_len):
    """Per-token construction from a layout: rows of pieces (lists of token ids)."""
    out = {k: np.zeros((len(layout), seq_len)) for k in KEYS}
    out["input_ids"][:] = PAD
    out["targets"][:] = PAD
    for r, pieces in enumerate(layout):
        p = 0
        for s, piece in enumerate(pieces):
            for i, tok in enumerate(piece):
                out["input_ids"][r, p] = tok
                out["segment_ids"][r, p] = s + 1
                out["positions"][r, p] = i
                if i + 1 < len(piece):
                    out["targets"][r, p] = piece[i + 1]
                    out["loss_mask"][r, p] = 1
                p += 1
    return out


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer_lib.train_bpe(TEXTS, 300, path)
    return str(path)


def test_packing_matches_hand_layout(tmp_path):
    docs = [[1, 2], [3, 4, 5], [6], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23]]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": d} for d in docs])
    batches = list(data.make_iterator(_ids_config(path, shuffle=False, num_epochs=1), 0, 1))
    e = [d + [EOS] for d in docs]  # lengths 3, 4, 2, 11, 5 with seq_len 8
    layout = [[e[0], e[1]],            # e[2] does not fit in the last slot: padding
              [e[2]],                  # e[3]'s first piece (8 tokens) does not fit
              [e[3][:8]],              # a long document is cut into seq_len pieces
              [e[3][8:], e[4]],        # 3 + 5 tokens: an exactly full row
              ]
    expected = _expected_rows(layout, 8)
    assert len(batches) == 2
    for k in KEYS:
        got = np.concatenate([b[k] for b in batches])
        np.testing.assert_array_equal(got, expected[k], err_msg=k)
        assert got.dtype == (np.float32 if k == "loss_mask" else np.int32)


def test_last_batch_padded_and_no_eos(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": [1, 2, 3]}, {"ids": [4, 5, 6, 7, 8, 9]}, {"ids": []}])
    cfg = _ids_config(path, shuffle=False, num_epochs=1, add_eos=False, global_batch_size=4)
    (batch,) = list(data.make_iterator(cfg, 0, 1))
    expected = _expected_rows([[[1, 2, 3]], [[4, 5, 6, 7, 8, 9]], [], []], 8)
    for k in KEYS:
        np.testing.assert_array_equal(batch[k], expected[k], err_msg=k)


def test_stream_invariants_and_document_multiset(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, rng.integers(0, 40)).tolist() for _ in range(60)]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": d} for d in docs])
    for shuffle in (False, True):
        cfg = _ids_config(path, seq_len=16, global_batch_size=3, shuffle=shuffle, num_epochs=1)
        stream = []
        for b in data.make_iterator(cfg, 0, 1):
            for r in range(3):
                seg = b["segment_ids"][r]
                for s in range(1, seg.max() + 1):
                    idx = np.flatnonzero(seg == s)
                    assert idx[0] + len(idx) - 1 == idx[-1]  # contiguous
                    np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
                    np.testing.assert_array_equal(b["targets"][r, idx[:-1]], b["input_ids"][r, idx[1:]])
                    np.testing.assert_array_equal(b["loss_mask"][r, idx], [1] * (len(idx) - 1) + [0])
                    stream.extend(b["input_ids"][r, idx].tolist())
                pad = seg == 0
                assert not b["loss_mask"][r, pad].any() and (b["positions"][r, pad] == 0).all()
                assert (seg[pad.argmax():] == 0).all() or not pad.any()  # padding only at the end
        flat = [t for d in docs for t in d + [EOS]]
        if shuffle:  # the EOS-split stream holds the same documents in another order
            split = lambda s: sorted(tuple(x) for x in np.split(s, np.flatnonzero(np.array(s) == EOS) + 1)[:-1])
            assert split(stream) == split(flat) and stream != flat
        else:
            assert stream == flat


def test_formats_give_same_batches(tmp_path, bpe_path):
    records = [{"text": t} for t in TEXTS]
    paths = {"jsonl": _write_jsonl(tmp_path / "d.jsonl", records),
             "arrayrecord": _write_arrayrecord(tmp_path / "d.array_record", records)}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        paths["parquet"] = str(tmp_path / "d.parquet")
        pq.write_table(pa.table({"text": TEXTS}), paths["parquet"], row_group_size=5)
    except ImportError:
        pass
    tok = tokenizer_lib.load_tokenizer(bpe_path)
    ids_path = _write_jsonl(tmp_path / "ids.jsonl", [{"ids": tok.encode(t).ids} for t in TEXTS])
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    pad = tok.token_to_id(tokenizer_lib.PAD_TOKEN)
    reference = _take(data.make_iterator(
        data.DataConfig(paths=ids_path, seq_len=32, global_batch_size=4, eos_id=eos, pad_id=pad), 0, 1), 6)
    for fmt, path in paths.items():
        cfg = data.DataConfig(paths=path, seq_len=32, global_batch_size=4, tokenizer=bpe_path)
        _assert_batches_equal(_take(data.make_iterator(cfg, 0, 1), 6), reference)


def test_several_files_and_glob(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"ids": [1, 2]}, {"ids": [3]}])
    _write_arrayrecord(tmp_path / "b.array_record", [{"ids": [4, 5, 6]}])
    _write_jsonl(tmp_path / "c.jsonl", [{"ids": [7]}])
    cfg = _ids_config([a, str(tmp_path / "[bc].*")], shuffle=False, num_epochs=1, seq_len=4)
    stream = [t for b in data.make_iterator(cfg, 0, 1) for t in b["input_ids"][b["segment_ids"] > 0]]
    assert stream == [1, 2, EOS, 3, EOS, 4, 5, 6, EOS, 7, EOS]


def test_deterministic_and_seed_dependent(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": list(range(i, 3 * i))} for i in range(1, 40)])
    take = lambda seed: _take(data.make_iterator(_ids_config(path, seed=seed), 0, 1), 5)
    _assert_batches_equal(take(3), take(3))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(take(3), take(4)))


@pytest.mark.parametrize("k", [0, 1, 4, 11])
def test_state_restore_resumes_exactly(tmp_path, k):
    rng = np.random.default_rng(1)  # long documents so that saved states fall inside split ones
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": rng.integers(0, 90, rng.integers(1, 30)).tolist()}
                                               for _ in range(15)])
    cfg = _ids_config(path, seed=5)  # infinite: 11 + 6 batches cross epoch boundaries
    it = data.make_iterator(cfg, 0, 1)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    restored = data.make_iterator(cfg, 0, 1)
    _take(restored, 2)  # restoring must also work on an iterator that has moved
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 6), expected)


def test_state_rejects_other_stream(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": [1, 2, 3]}])
    state = data.make_iterator(_ids_config(path, seed=1), 0, 1).get_state()
    with pytest.raises(ValueError, match="seed"):
        data.make_iterator(_ids_config(path, seed=2), 0, 1).set_state(state)


def test_two_process_sharding(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"ids": list(range(i % 13 + 1))} for i in range(50)])
    cfg = _ids_config(path, global_batch_size=4, num_epochs=2)
    single = list(data.make_iterator(cfg, 0, 1))
    parts = [list(data.make_iterator(cfg, p, 2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)
    for whole, p0, p1 in zip(single, *parts):
        assert p0["input_ids"].shape == (2, 8)
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), whole[k], err_msg=k)
    # A state saved by one process count resumes on another.
    it = data.make_iterator(cfg, 0, 1)
    _take(it, 3)
    moved = data.make_iterator(cfg, 1, 2)
    moved.set_state(it.get_state())
    np.testing.assert_array_equal(next(moved)["input_ids"], single[3]["input_ids"][2:])
    with pytest.raises(ValueError, match="divisible"):
        data.make_iterator(cfg, 0, 3)


def test_tokenizer_round_trip_and_deterministic(tmp_path, bpe_path):
    tok = tokenizer_lib.load_tokenizer(bpe_path)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    assert tok.get_vocab_size() == 300
    for text in TEXTS + ["unseen: Zebra 123 ∑ \t\n end"]:
        assert tok.decode(tok.encode(text).ids) == text
    tokenizer_lib.train_bpe(TEXTS, 300, tmp_path / "again.json")
    with open(bpe_path) as f1, open(tmp_path / "again.json") as f2:
        assert f1.read() == f2.read()


def test_errors(tmp_path, bpe_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        data.make_iterator(_ids_config(str(tmp_path / "nothing-here*.jsonl")), 0, 1)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        data.make_iterator(_ids_config(str(tmp_path / "absent.jsonl")), 0, 1)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"ids": [1]}, {"ids": [2]}, {"txt": "typo"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl' record 2 has neither"):
        list(data.make_iterator(_ids_config(bad, shuffle=False, num_epochs=1), 0, 1))
    bad_ar = _write_arrayrecord(tmp_path / "bad.array_record", [{"ids": [1]}, {"ids": "x"}])
    with pytest.raises(ValueError, match=r"bad\.array_record' record 1: 'ids' must be"):
        list(data.make_iterator(_ids_config(bad_ar, shuffle=False, num_epochs=1), 0, 1))
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match="no tokenizer"):
        next(data.make_iterator(_ids_config(text), 0, 1))
    with pytest.raises(ValueError, match="format"):
        data.make_iterator(_ids_config(_write_jsonl(tmp_path / "d.txt", [])), 0, 1)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tokenizer_lib.load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        tokenizer_lib.load_tokenizer(_write_jsonl(tmp_path / "junk.json", [{"a": 1}]))


def test_quickstart_dataset(tmp_path):
    texts = corpus.quickstart_corpus()
    assert texts == corpus.quickstart_corpus()
    assert 200_000 < sum(map(len, texts)) < 1_000_000 and len(set(texts)) == len(texts)
    files = corpus.write_quickstart_dataset(tmp_path)
    tok = tokenizer_lib.load_tokenizer(files.tokenizer_path)
    assert 512 <= tok.get_vocab_size() <= 1024
    cfg = data.DataConfig(paths=files.data_path, seq_len=128, global_batch_size=4,
                          tokenizer=files.tokenizer_path, shuffle=False, num_epochs=1)
    batch = next(data.make_iterator(cfg, 0, 1))
    first = batch["input_ids"][0][batch["segment_ids"][0] == 1].tolist()
    assert len(first) > 10 and texts[0].startswith(tok.decode(first))
    assert os.path.getsize(files.data_path) > 200_000
