"""Continuous-batching inference engine over one paged DecodeCache.

The cache holds `max_slots` sequence slots: a per-slot fp32 Lightning state and, for the MLA layers, one shared pool
of latent pages with a page table row per slot. Page 0 is a scratch page that is never allocated: idle or
prefilling rows of a decode step point at it, so their writes land nowhere that matters, and their Lightning
states are restored after the step.

Each iteration admits queued requests into free slots (FIFO, when the pool has every page the request can need),
runs one prefill piece of one prompt, then one decode step over the decoding slots. A finished sequence frees its
slot and its pages at once.

Compiled shapes are bounded: a prompt of P tokens is prefilled as the power-of-two pieces of P mod chunk (first,
while the cache is short) followed by P // chunk full chunks, and each piece sees a page table cut to a
power-of-two width covering its end; the decode step runs on slots [0, bucket) for power-of-two buckets. So at
most log2(chunk) + log2(max_pages) prefill shapes and log2(max_slots) decode shapes ever compile.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling.cache import DecodeCache, constrain_cache, init_cache, put_rows, take_rows, where_rows
from ling.model import LingModel
from ling.sampling import sample_tokens
from ling.serving.requests import Limits, Request, RequestError, validate_request
from sharding.mesh import active_mesh

SCRATCH_PAGE = 0


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_slots: sequences decoded together. max_len: tokens per sequence (prompt + generated). page_size: tokens
    per MLA cache page. num_pages: pool size including the scratch page (default: every slot at max_len).
    prefill_chunk: prompt tokens per prefill step, a power of two (bounds prefill memory)."""

    max_slots: int = 8
    max_len: int = 4096
    page_size: int = 64
    num_pages: int | None = None
    prefill_chunk: int = 256

    @property
    def max_pages(self) -> int:
        """Page-table width: pages one sequence of max_len tokens can use."""
        return -(-self.max_len // self.page_size)

    def pool_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else self.max_slots * self.max_pages + 1

    def validate(self, max_position_embeddings: int) -> None:
        for name in ("max_slots", "max_len", "page_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_chunk & (self.prefill_chunk - 1):
            raise ValueError(f"EngineConfig.prefill_chunk must be a power of two, got {self.prefill_chunk}")
        if self.max_len > max_position_embeddings:
            raise ValueError(f"EngineConfig.max_len={self.max_len} exceeds the model's max_position_embeddings="
                             f"{max_position_embeddings}")
        if self.pool_pages() < 2:
            raise ValueError(f"EngineConfig.num_pages={self.num_pages}: need the scratch page and at least one more")


def prefill_pieces(prompt_len: int, chunk: int) -> list[int]:
    """Piece sizes that sum to prompt_len: the binary digits of prompt_len mod chunk (largest first), then full
    chunks. Small pieces come first so they run while the cache is short."""
    rem = prompt_len % chunk
    bits = [1 << i for i in reversed(range(rem.bit_length())) if rem >> i & 1]
    return bits + [chunk] * (prompt_len // chunk)


def sample_rows(logits_bv, seed_b, step_b, temperature_b, top_k_b, top_p_b):
    """Next token per row [B] with a per-row key fold_in(key(seed), step), so a request's draws do not depend on
    which other requests share its batch."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_b, step_b)
    one = lambda l, k, t, tk, tp: sample_tokens(l[None], k, t[None], tk[None], tp[None])[0]
    return jax.vmap(one)(logits_bv, keys, temperature_b, top_k_b, top_p_b)


_sample = jax.jit(sample_rows)
_place = jax.jit(constrain_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "width"), donate_argnames=("cache",))
def _prefill_piece(graphdef, params, cache: DecodeCache, slot, start, ids_1t, *, width: int):
    """Extend slot `slot` (holding `start` tokens) by ids [1, T]; -> (last logits [1, V], cache)."""
    rows = take_rows(cache, slot, 1)
    blank = jax.tree.map(jnp.zeros_like, rows).replace(lengths=rows.lengths, page_table=rows.page_table)
    rows = where_rows(jnp.reshape(start > 0, (1,)), rows, blank)  # a new sequence starts from a zero state
    view = rows.replace(lengths=jnp.reshape(start, (1,)), page_table=rows.page_table[:, :width])
    out = nnx.merge(graphdef, params).forward(ids_1t, cache=view, last_logits_only=True)
    return out.logits[:, -1], constrain_cache(put_rows(cache, slot, out.cache.replace(page_table=rows.page_table)))


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"), donate_argnames=("cache",))
def _decode_step(graphdef, params, cache: DecodeCache, tokens_b, lengths_b, active_b, sampling, *, bucket: int):
    """One token for each active row of slots [0, bucket); -> (next tokens [bucket], logits [bucket, V], cache)."""
    rows = take_rows(cache, 0, bucket)
    view = rows.replace(lengths=jnp.where(active_b, lengths_b, 0),
                        page_table=jnp.where(active_b[:, None], rows.page_table, SCRATCH_PAGE))
    out = nnx.merge(graphdef, params).forward(tokens_b[:, None], cache=view)
    new_rows = where_rows(active_b, out.cache.replace(page_table=rows.page_table), rows)
    logits_bv = out.logits[:, -1]
    return sample_rows(logits_bv, *sampling), logits_bv, constrain_cache(put_rows(cache, 0, new_rows))


@dataclasses.dataclass
class _Slot:
    request: Request
    pages: list[int]
    pieces: collections.deque  # prefill pieces still to run
    length: int = 0  # tokens in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far; the last is not yet cached
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)  # with keep_logits


@dataclasses.dataclass(frozen=True)
class Finished:
    """A request's outcome: generated token_ids (the stop/eos token included) and finish_reason, or error."""

    request: Request
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    logits: np.ndarray | None = None  # [len(token_ids), V] float32 each token was drawn from (keep_logits)


class Engine:
    """Serves Requests from one model with continuous batching. detokenize (ids -> text) enables stop strings;
    eos_ids default to the model config's; keep_logits returns each token's logits (for tests; costs a transfer)."""

    def __init__(self, model: LingModel, config: EngineConfig, *, detokenize: Callable | None = None,
                 eos_ids: Iterable[int] | None = None, keep_logits: bool = False):
        mc = model.config
        config.validate(mc.max_position_embeddings)
        self.config = config
        self.limits = Limits(vocab_size=mc.vocab_size, max_len=config.max_len)
        self.detokenize = detokenize
        self.keep_logits = keep_logits
        self.eos_ids = frozenset(mc.eos_token_ids if eos_ids is None else eos_ids)
        self._graphdef, self._params = nnx.split(model)
        s, p = config.max_slots, config.max_pages
        self._page_table = np.full((s, p), SCRATCH_PAGE, np.int32)
        self.cache = init_cache(mc, s, config.max_len, dtype=model.dtype, page_size=config.page_size,
                                num_pages=config.pool_pages(), page_table=self._page_table.copy())
        self._free_pages = collections.deque(range(1, config.pool_pages()))
        self._slots: list[_Slot | None] = [None] * s
        self.stats = collections.Counter()

    # ----- public API -----
    def run(self, requests: Iterable[Request], on_token: Callable[[Request, int], None] | None = None
            ) -> Iterator[Finished]:
        """Serve every request; yields each one's Finished as soon as it completes (not in input order)."""
        self._place_cache()
        queue = collections.deque()
        for r in requests:
            try:
                self.check(r)
                queue.append(r)
            except RequestError as e:
                yield Finished(r, error=str(e))
        while queue or any(self._slots):
            while queue and self._admit(queue[0]):
                queue.popleft()
            done = self._prefill_one(on_token) + self._decode(on_token)
            yield from done

    def check(self, request: Request) -> None:
        """RequestError unless the request is valid and its pages fit the pool."""
        validate_request(request, self.limits)
        if request.stop_strings and self.detokenize is None:
            raise RequestError("stop strings need a tokenizer; this engine has none (give stop token ids)")
        need = self._pages_needed(request)
        if need > self.config.pool_pages() - 1:
            raise RequestError(f"request needs {need} cache pages of {self.config.page_size} tokens; the pool has "
                               f"{self.config.pool_pages() - 1}")

    # ----- scheduling -----
    def _pages_needed(self, r: Request) -> int:
        # The last generated token is never fed back, so it needs no cache position.
        return -(-(len(r.prompt_ids) + r.max_new_tokens - 1) // self.config.page_size)

    def _admit(self, r: Request) -> bool:
        need = self._pages_needed(r)
        if None not in self._slots or len(self._free_pages) < need:
            return False
        slot = self._slots.index(None)  # lowest free slot keeps the decode bucket small
        pages = [self._free_pages.popleft() for _ in range(need)]
        self._page_table[slot, :need] = pages
        self._slots[slot] = _Slot(r, pages, collections.deque(prefill_pieces(len(r.prompt_ids),
                                                                             self.config.prefill_chunk)))
        self._sync_page_table()
        return True

    def _release(self, slot: int) -> None:
        self._free_pages.extend(self._slots[slot].pages)
        self._page_table[slot] = SCRATCH_PAGE
        self._slots[slot] = None
        self._sync_page_table()

    def _place_cache(self) -> None:
        """Put the cache where the steps leave it (their layout under the mesh this runs in, or committed to the
        parameters' device), so the first step compiles the same program as the later ones."""
        if active_mesh() is None:
            self.cache = jax.device_put(self.cache, jax.tree.leaves(self._params)[0].sharding)
        else:
            self.cache = _place(self.cache)

    def _sync_page_table(self) -> None:
        # A copy: on CPU a device array may alias host memory, and this table keeps changing. Placed like the
        # table it replaces, so the next step finds the layout it was compiled for.
        table = self._page_table.copy()
        self.cache = self.cache.replace(page_table=jax.device_put(table, self.cache.page_table.sharding))

    def _finish_reason(self, s: _Slot) -> str | None:
        r, toks = s.request, s.tokens
        if toks[-1] in self.eos_ids:
            return "eos"
        if any(len(toks) >= len(q) and tuple(toks[-len(q):]) == q for q in r.stop_ids):
            return "stop"
        if r.stop_strings and any(t in self.detokenize(toks) for t in r.stop_strings):
            return "stop"
        return "length" if len(toks) >= r.max_new_tokens else None

    def _accept(self, slot: int, token: int, logits_v, on_token) -> list[Finished]:
        s = self._slots[slot]
        s.tokens.append(token)
        if self.keep_logits:
            s.logits.append(np.asarray(logits_v, np.float32))
        if on_token is not None:
            on_token(s.request, token)
        reason = self._finish_reason(s)
        if reason is None:
            return []
        self._release(slot)
        self.stats["finished"] += 1
        return [Finished(s.request, tuple(s.tokens), reason, logits=np.stack(s.logits) if s.logits else None)]

    # ----- device steps -----
    def _prefill_one(self, on_token) -> list[Finished]:
        slot = next((i for i, s in enumerate(self._slots) if s is not None and s.pieces), None)
        if slot is None:
            return []
        s = self._slots[slot]
        t = s.pieces.popleft()
        end = s.length + t
        width = min(_pow2_at_least(-(-end // self.config.page_size)), self.config.max_pages)
        ids = jnp.asarray([s.request.prompt_ids[s.length:end]], jnp.int32)
        logits, self.cache = _prefill_piece(self._graphdef, self._params, self.cache, jnp.int32(slot),
                                            jnp.int32(s.length), ids, width=width)
        s.length = end
        self.stats["prefill_tokens"] += t
        if s.pieces:
            return []
        r = s.request
        token = _sample(logits, *(np.asarray([x], dt) for x, dt in (
            (r.seed, np.uint32), (0, np.int32), (r.temperature, np.float32), (r.top_k, np.int32),
            (r.top_p, np.float32))))
        return self._accept(slot, int(token[0]), logits[0], on_token)

    def _decode(self, on_token) -> list[Finished]:
        active = [i for i, s in enumerate(self._slots) if s is not None and not s.pieces and s.tokens]
        if not active:
            return []
        bucket = min(_pow2_at_least(active[-1] + 1), self.config.max_slots)
        rows = [self._slots[i] if i in active else None for i in range(bucket)]

        def col(fn, dtype):
            return np.asarray([fn(s) if s is not None else 0 for s in rows], dtype)

        sampling = (col(lambda s: s.request.seed, np.uint32), col(lambda s: len(s.tokens), np.int32),
                    col(lambda s: s.request.temperature, np.float32), col(lambda s: s.request.top_k, np.int32),
                    col(lambda s: s.request.top_p, np.float32))
        next_b, logits_bv, self.cache = _decode_step(
            self._graphdef, self._params, self.cache, col(lambda s: s.tokens[-1], np.int32),
            col(lambda s: s.length, np.int32), np.asarray([s is not None for s in rows]), sampling, bucket=bucket)
        next_b = np.asarray(next_b)
        logits_bv = np.asarray(logits_bv) if self.keep_logits else None
        self.stats["decode_steps"] += 1
        done = []
        for i in active:
            self._slots[i].length += 1
            done += self._accept(i, int(next_b[i]), None if logits_bv is None else logits_bv[i], on_token)
        return done
