"""Training data: file sources -> shuffled token documents -> packed [B, T] batches.

API::

    cfg = DataConfig(paths="data/*.jsonl", seq_len=2048, global_batch_size=256,
                     tokenizer="tokenizer.json")
    it = make_iterator(cfg, process_index=None, process_count=None)  # None: jax.process_*()
    batch = next(it)          # dict of numpy arrays [global_batch_size // process_count, seq_len]
    state = it.get_state()    # JSON-serialisable dict
    it2 = make_iterator(cfg); it2.set_state(state)  # it2 yields exactly what `it` yields next

Batch arrays: `input_ids`, `targets` (next token of the same document), `segment_ids`
(1, 2, ... per document in a row, 0 on padding), `positions` (0-based within the
document) are int32; `loss_mask` is float32, 1 where `targets` is a real next token. The
model must keep attention and the Lightning recurrence inside one segment.

Sources are picked per file by extension (`.jsonl`, `.parquet`, `.array_record` /
`.arrayrecord`) or by `DataConfig.format`. A record is a JSON object (ArrayRecord: JSON
bytes; Parquet: a row) with a "text" string or an "ids" list of token ids; "text" is used
when a tokenizer is configured, else "ids". Parquet is read a row group at a time, so a
global shuffle over large Parquet files is slow: convert big corpora to ArrayRecord.

Pipeline: a grain MapDataset over all records, shuffled per epoch with `seed`,
repeated `num_epochs` times (None: forever), mapped to token arrays (EOS appended when
`add_eos`) and read in order by `read_threads` threads. Documents are packed greedily
into rows of exactly `seq_len` tokens: a document that does not fit in the open row
closes it (the rest is padding) and starts the next row; a document longer than
`seq_len` is cut into `seq_len`-token pieces, each its own segment with positions
restarting at 0. When a finite stream ends, the last batch is filled with padding rows.

Every process packs the same global stream and keeps rows
[process_index * b, (process_index + 1) * b) of each global batch, b =
global_batch_size // process_count. So the global batch does not depend on the number
of processes and a state saved on one topology resumes on another; the price is that
every process tokenises every document of the global batch. The state is the position
(document index in the shuffled stream, token offset inside it) of the first token not
yet emitted: a restored iterator re-reads from there and packs exactly as before.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import threading
from collections.abc import Sequence

import grain
import jax
import numpy as np

from trainer import tokenizer as tokenizer_lib

_FORMATS = ("auto", "arrayrecord", "jsonl", "parquet")
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to read and how to batch it. eos_id/pad_id None: taken from the tokenizer."""
    paths: str | Sequence[str]   # files or globs; several allowed
    seq_len: int
    global_batch_size: int
    format: str = "auto"         # "auto" (by extension), "arrayrecord", "jsonl", "parquet"
    seed: int = 0
    shuffle: bool = True
    tokenizer: str | None = None  # tokenizer.json path; None for sources with "ids"
    add_eos: bool = True
    eos_id: int | None = None
    pad_id: int | None = None    # None: the tokenizer's <|pad|>, else eos_id, else 0
    num_epochs: int | None = None
    read_threads: int = 2

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if not self.paths:
            raise ValueError("DataConfig.paths is empty")
        if self.format not in _FORMATS:
            raise ValueError(f"DataConfig.format={self.format!r} is not one of {_FORMATS}")
        for name in ("seq_len", "global_batch_size", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs={self.num_epochs} must be None or >= 1")


def _format_of(path: str, format: str) -> str:
    if format != "auto":
        return format
    name = os.path.basename(path)
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if ".array_record" in name or ".arrayrecord" in name:  # also sharded "x.array_record-00000-of-00008"
        return "arrayrecord"
    raise ValueError(f"cannot tell the format of {path!r} from its name; set DataConfig.format")


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files matched by each path or glob, in the given order (sorted within a glob)."""
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matched = [p for p in matched if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"no data file matches {pattern!r}")
        files.extend(matched)
    return files


class _JsonlFile:
    """Random access to the non-blank lines of a JSONL file via byte offsets."""

    def __init__(self, path: str):
        spans, offset = [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    spans.append((offset, len(line)))
                offset += len(line)
        self._spans = np.asarray(spans, np.int64).reshape(-1, 2)
        self._fd = os.open(path, os.O_RDONLY)  # os.pread is safe across reader threads

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> bytes:
        start, size = self._spans[index]
        return os.pread(self._fd, int(size), int(start))


class _ParquetFile:
    """Rows of a Parquet file with a "text" or "ids" column, read a row group at a time."""

    def __init__(self, path: str):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading the Parquet file {path!r} needs pyarrow: "
                              "pip install pyarrow") from e
        self._file = pq.ParquetFile(path)
        names = self._file.schema_arrow.names
        if "text" not in names and "ids" not in names:
            raise ValueError(f"{path!r}: record 0 has neither a 'text' nor an 'ids' column "
                             f"(columns: {names})")
        self._columns = [c for c in ("text", "ids") if c in names]
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.cumsum([0] + sizes)
        self._lock = threading.Lock()  # one ParquetFile is not safe for concurrent reads
        self._row_group = functools.lru_cache(maxsize=4)(self._read_row_group)

    def _read_row_group(self, group: int) -> dict[str, list]:
        with self._lock:
            return self._file.read_row_group(group, columns=self._columns).to_pydict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        columns = self._row_group(group)
        row = index - int(self._starts[group])
        return {c: columns[c][row] for c in self._columns if columns[c][row] is not None}


_READERS = {"jsonl": _JsonlFile, "parquet": _ParquetFile,
            "arrayrecord": lambda path: grain.sources.ArrayRecordDataSource([path])}


class DocumentSource:
    """All records of `files` as one random-access sequence of documents.

    Item i is a str (the record's "text", when `use_text`) or an int64 array of token ids.
    """

    def __init__(self, files: Sequence[str], format: str = "auto", use_text: bool = True):
        self._paths = list(files)
        self._files = [_READERS[_format_of(f, format)](f) for f in files]
        self._starts = np.cumsum([0] + [len(f) for f in self._files])
        self._use_text = use_text

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> str | np.ndarray:
        file_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[file_index])
        where = f"{self._paths[file_index]!r} record {local}"
        record = self._files[file_index][local]
        if isinstance(record, bytes):
            try:
                record = json.loads(record)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where} is not valid JSON: {e}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a {type(record).__name__}, not a JSON object")
        if self._use_text and isinstance(record.get("text"), str):
            return record["text"]
        if "ids" in record:
            ids = np.asarray(record["ids"])
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(f"{where}: 'ids' must be a list of integers, got {record['ids']!r:.80}")
            if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
                raise ValueError(f"{where}: 'ids' holds values outside [0, 2**31)")
            return ids.astype(np.int64)
        if "text" in record:
            raise ValueError(f"{where} has 'text' but no tokenizer is configured (DataConfig.tokenizer)")
        raise ValueError(f"{where} has neither a 'text' nor an 'ids' field (keys: {sorted(record)})")


def pack_rows(rows: Sequence[Sequence[np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Turns rows of segments (1-D token arrays, at most seq_len tokens per row) into [B, T] arrays."""
    shape = (len(rows), seq_len)
    batch = {"input_ids": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
             "loss_mask": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32),
             "positions": np.zeros(shape, np.int32)}
    for r, segments in enumerate(rows):
        start = 0
        for segment_id, tokens in enumerate(segments, start=1):
            end = start + len(tokens)
            if end > seq_len:
                raise ValueError(f"row {r} holds {end} tokens, more than seq_len={seq_len}")
            batch["input_ids"][r, start:end] = tokens
            # A segment's last token has no next token inside the segment: it keeps pad_id, mask 0.
            batch["targets"][r, start:end - 1] = tokens[1:]
            batch["loss_mask"][r, start:end - 1] = 1.0
            batch["segment_ids"][r, start:end] = segment_id
            batch["positions"][r, start:end] = np.arange(len(tokens))
            start = end
    return batch


def _to_tokens(document: str | np.ndarray, tokenizer, eos_id: int | None) -> np.ndarray:
    if isinstance(document, str):
        document = tokenizer.encode(document, add_special_tokens=False).ids
    tokens = np.asarray(document, np.int32)
    return tokens if eos_id is None else np.append(tokens, np.int32(eos_id))


class DataIterator:
    """Yields this process's rows of each packed global batch; see the module docstring."""

    def __init__(self, cfg: DataConfig, documents: grain.MapDataset, num_records: int,
                 pad_id: int, process_index: int, process_count: int):
        self._cfg, self._documents, self._num_records, self._pad_id = cfg, documents, num_records, pad_id
        rows = cfg.global_batch_size // process_count
        self._local_rows = slice(process_index * rows, (process_index + 1) * rows)
        self._reader = None
        self._restart(0, 0)

    def _restart(self, doc_index: int, token_offset: int) -> None:
        if self._reader is not None:
            self._reader.close()
        options = grain.ReadOptions(num_threads=self._cfg.read_threads, prefetch_buffer_size=128)
        self._reader = iter(self._documents[doc_index:].to_iter_dataset(options))
        self._next_doc = doc_index       # stream index of the next document the reader yields
        self._doc = np.zeros(0, np.int32)  # the document being cut into pieces
        self._doc_index, self._doc_offset = doc_index, 0
        self._skip = token_offset        # tokens of the first document already emitted
        self._carry = None               # ((doc index, offset), piece) that did not fit its row
        self._exhausted = False

    def _position(self) -> tuple[int, int]:
        """(document index, token offset) of the first token not yet in an emitted row."""
        if self._carry is not None:
            return self._carry[0]
        if self._doc_offset < len(self._doc):
            return self._doc_index, self._doc_offset
        return self._next_doc, self._skip

    def _next_piece(self):
        while self._doc_offset >= len(self._doc):  # also skips empty documents
            self._doc = next(self._reader)
            self._doc_index, self._doc_offset, self._skip = self._next_doc, self._skip, 0
            self._next_doc += 1
        position = (self._doc_index, self._doc_offset)
        self._doc_offset += self._cfg.seq_len
        return position, self._doc[position[1]:self._doc_offset]

    def _next_row(self) -> list[np.ndarray]:
        segments, used = [], 0
        while used < self._cfg.seq_len and not self._exhausted:
            if self._carry is not None:
                (position, piece), self._carry = self._carry, None
            else:
                try:
                    position, piece = self._next_piece()
                except StopIteration:
                    self._exhausted = True
                    break
            if used + len(piece) > self._cfg.seq_len:
                self._carry = (position, piece)
                break
            segments.append(piece)
            used += len(piece)
        return segments

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self._cfg.global_batch_size and (row := self._next_row()):
            rows.append(row)
        if not rows:
            raise StopIteration
        rows += [[]] * (self._cfg.global_batch_size - len(rows))  # end of a finite stream
        return pack_rows(rows[self._local_rows], self._cfg.seq_len, self._pad_id)

    def _stream_identity(self) -> dict:
        return {"seed": self._cfg.seed, "shuffle": self._cfg.shuffle, "num_records": self._num_records}

    def get_state(self) -> dict:
        """JSON-serialisable position of the next batch in the document stream."""
        doc_index, token_offset = self._position()
        return {"version": _STATE_VERSION, "doc_index": int(doc_index),
                "token_offset": int(token_offset), **self._stream_identity()}

    def set_state(self, state: dict) -> None:
        """Resumes at `state` (from get_state, possibly of another process count or seq_len)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} "
                             f"is not {_STATE_VERSION}")
        for key, value in self._stream_identity().items():
            if state.get(key) != value:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r} but this "
                                 f"pipeline has {key}={value!r}: it is not the same document stream")
        self._restart(int(state["doc_index"]), int(state["token_offset"]))


def make_iterator(cfg: DataConfig, process_index: int | None = None,
                  process_count: int | None = None) -> DataIterator:
    """The batch iterator of process `process_index` of `process_count` (None: ask jax)."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                         f"process_count={process_count}")
    files = expand_paths(cfg.paths)
    tok = tokenizer_lib.load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    eos_id, pad_id = cfg.eos_id, cfg.pad_id
    if eos_id is None and tok is not None:
        eos_id = tokenizer_lib.token_id(tok, tokenizer_lib.EOS_TOKEN)
    if cfg.add_eos and eos_id is None:
        raise ValueError("DataConfig.add_eos needs eos_id when there is no tokenizer")
    if pad_id is None and tok is not None and tok.token_to_id(tokenizer_lib.PAD_TOKEN) is not None:
        pad_id = tok.token_to_id(tokenizer_lib.PAD_TOKEN)
    if pad_id is None:  # padding is masked out everywhere, so any valid id will do
        pad_id = eos_id if eos_id is not None else 0
    source = DocumentSource(files, cfg.format, use_text=tok is not None)
    if len(source) == 0:
        raise ValueError(f"the data files {files} hold no records")
    documents = grain.MapDataset.source(source)
    if cfg.shuffle:
        documents = documents.shuffle(seed=cfg.seed)  # reshuffled each epoch by repeat()
    documents = documents.repeat(cfg.num_epochs).map(functools.partial(
        _to_tokens, tokenizer=tok, eos_id=eos_id if cfg.add_eos else None))
    return DataIterator(cfg, documents, len(source), pad_id, process_index, process_count)
