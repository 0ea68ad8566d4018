"""Batch-job records: JSONL input lines -> validated `Request`s, finished sequences -> output records.

Every problem with one line (bad JSON, an unknown or mistyped field, an empty or too long prompt, a token id
outside the vocabulary, an invalid sampling parameter) raises `RequestError`, which the caller turns into that
request's `{"id", "error"}` record; nothing is truncated or clamped silently.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

FIELDS = ("id", "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "chat")
FINISH_REASONS = ("stop", "length", "eos")
DEFAULT_MAX_NEW_TOKENS = 128


class RequestError(ValueError):
    """One request cannot be served; the message says why."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request. stop_ids: token-id sequences that end generation; stop_strings: text that
    ends it (needs a tokenizer to detokenise)."""

    id: Any
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine and model accept: vocab_size (ids must be below it), max_len (prompt + new tokens)."""

    vocab_size: int
    max_len: int


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(d: dict, key: str, default: float) -> float:
    x = d.get(key, default)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        raise RequestError(f"{key} must be a finite number, got {x!r}")
    try:
        return float(x)
    except OverflowError:
        raise RequestError(f"{key} is out of range: {x}") from None


def _integer(d: dict, key: str, default: int) -> int:
    x = d.get(key, default)
    if not _is_int(x):
        raise RequestError(f"{key} must be an integer, got {x!r}")
    return x


def _check_ids(ids: list, what: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
        raise RequestError(f"{what} must be a list of integer token ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RequestError(f"{what} has {len(bad)} token id(s) outside the vocabulary [0, {vocab_size}): "
                           f"{bad[:5]}")
    return tuple(ids)


def _stops(value, tokenizer, vocab_size: int) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """`stop`: a string, an id, or a list of strings, ids and id lists -> (id sequences, strings)."""
    items = value if isinstance(value, list) else [value]
    ids, strings = [], []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise RequestError("stop strings must be non-empty")
            if tokenizer is None:
                raise RequestError(f"stop string {item!r} needs a tokenizer (the checkpoint has no tokenizer.json); "
                                   "give stop token ids instead")
            strings.append(item)
        elif _is_int(item):
            ids.append(_check_ids([item], "stop", vocab_size))
        elif isinstance(item, list) and item:
            ids.append(_check_ids(item, "stop", vocab_size))
        else:
            raise RequestError(f"stop entries must be strings, token ids or non-empty id lists, got {item!r}")
    return tuple(ids), tuple(strings)


def parse_request(record: dict, limits: Limits, tokenizer=None, defaults: dict | None = None) -> Request:
    """A validated Request from one decoded JSON object; `defaults` fill the fields it does not set. RequestError
    on any problem."""
    if not isinstance(record, dict):
        raise RequestError(f"a request must be a JSON object, got {type(record).__name__}")
    record = {**(defaults or {}), **record}
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; accepted: {list(FIELDS)}")
    if record.get("chat"):
        raise RequestError("chat templates are not rendered by this server (no Jinja); apply the template to the "
                           "prompt yourself or send prompt_ids")
    if ("prompt" in record) == ("prompt_ids" in record):
        raise RequestError("give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        if tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer (the checkpoint has no tokenizer.json); "
                               "send prompt_ids")
        ids = tokenizer.encode(text).ids if text else []
        prompt_ids = _check_ids(ids, "the tokenised prompt", limits.vocab_size)
    else:
        prompt_ids = _check_ids(record["prompt_ids"], "prompt_ids", limits.vocab_size)
    max_new = _integer(record, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    temperature = _number(record, "temperature", 0.0)
    top_p = _number(record, "top_p", 1.0)
    top_k = _integer(record, "top_k", 0)
    seed = _integer(record, "seed", 0)
    stop_ids, stop_strings = _stops(record.get("stop", []), tokenizer, limits.vocab_size)
    request = Request(id=record.get("id"), prompt_ids=prompt_ids, max_new_tokens=max_new, temperature=temperature,
                      top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids, stop_strings=stop_strings)
    validate_request(request, limits)
    return request


def validate_request(request: Request, limits: Limits) -> None:
    """RequestError unless the prompt is non-empty and in the vocabulary, prompt + max_new_tokens fits
    limits.max_len, and the sampling parameters are in range."""
    r = request
    if not r.prompt_ids:
        raise RequestError("the prompt is empty")
    _check_ids(list(r.prompt_ids), "prompt_ids", limits.vocab_size)
    for seq in r.stop_ids:
        _check_ids(list(seq), "stop", limits.vocab_size)
    if r.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    total = len(r.prompt_ids) + r.max_new_tokens
    if total > limits.max_len:
        raise RequestError(f"prompt of {len(r.prompt_ids)} tokens + max_new_tokens {r.max_new_tokens} = {total} "
                           f"exceeds the maximum sequence length {limits.max_len}")
    if not (math.isfinite(r.temperature) and r.temperature >= 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {r.top_p}")
    if r.top_k < 0:
        raise RequestError(f"top_k must be >= 0 (0 = off), got {r.top_k}")
    if not 0 <= r.seed < 2**32:
        raise RequestError(f"seed must be in [0, 2**32), got {r.seed}")


def parse_line(line: str, line_no: int, limits: Limits, tokenizer=None, defaults: dict | None = None
               ) -> Request | dict:
    """A Request, or the error record for this line. A record without `id` is named by its line number."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return {"id": None, "line": line_no, "error": f"line {line_no}: invalid JSON: {e}"}
    rid = record.get("id", line_no) if isinstance(record, dict) else None
    try:
        return dataclasses.replace(parse_request(record, limits, tokenizer, defaults), id=rid)
    except RequestError as e:
        return {"id": rid, "error": str(e)}


def output_record(request: Request, token_ids: list[int], finish_reason: str, tokenizer=None) -> dict:
    """The output line of a finished request: id, token_ids (generated, stop/eos token included), text (decoded,
    special tokens skipped, cut before a matched stop string) when a tokenizer exists, finish_reason."""
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    record = {"id": request.id, "token_ids": list(map(int, token_ids))}
    if tokenizer is not None:
        text = tokenizer.decode(record["token_ids"], skip_special_tokens=True)
        cut = [text.find(s) for s in request.stop_strings if s in text]
        record["text"] = text[:min(cut)] if cut else text
    record["finish_reason"] = finish_reason
    return record
