"""Training metrics: `workdir/metrics.jsonl` (the record of truth), TensorBoard scalars in `workdir/tb/` written
without the tensorboard package, a one-line progress string and a loss plot.

TFRecord framing of an events file, per record (little-endian):
    uint64 len(data) | uint32 masked_crc32c(len bytes) | data | uint32 masked_crc32c(data)
with masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32). `data` is a serialized tensorflow.Event:
    wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary)
    Summary.value = 1 (repeated Value);  Value.tag = 1 (string), Value.simple_value = 2 (float)
The first record of a file is an Event with file_version "brain.Event:2".
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_RESERVED = ("step", "time")


def _crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_scalar_event(wall_time: float, step: int, scalars: dict[str, float]) -> bytes:
    """Serialized Event{wall_time, step, summary{value{tag, simple_value}...}}."""
    summary = b"".join(
        _len_field(1, _len_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
        for tag, value in scalars.items())
    return (_varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
            + _len_field(5, summary))


def _file_version_event(wall_time: float) -> bytes:
    return _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _len_field(3, b"brain.Event:2")


def _frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k in _RESERVED:
            raise ValueError(f"metric name {k!r} is reserved")
        arr = np.asarray(v)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"metric {k!r} must be a numeric scalar, got shape {arr.shape} dtype {arr.dtype}")
        out[k] = float(arr.reshape(()))
    return out


class MetricsLogger:
    """Appends `{"step", "time", **metrics}` per `log` call to metrics.jsonl (flushed) and the same scalars to a
    TensorBoard events file. Before the first `log`, call `truncate_after(restored_step)` on resume, or
    `truncate_after(-1)` to start a fresh run in a workdir that already holds metrics."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self.jsonl_path = os.path.join(self.workdir, METRICS_FILE)
        self.tb_dir = os.path.join(self.workdir, TB_DIR)
        os.makedirs(self.tb_dir, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a")
        self._events = None
        self._events_path = None
        self._open_events()

    def _open_events(self) -> None:
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}"
        self._events_path = os.path.join(self.tb_dir, name)
        self._events = open(self._events_path, "wb")
        self._events.write(_frame(_file_version_event(now)))
        self._events.flush()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record numeric scalars (Python, numpy or jax) for `step`."""
        scalars = _scalars(metrics)
        now = time.time()
        self._jsonl.write(json.dumps({"step": int(step), "time": now, **scalars}) + "\n")
        self._jsonl.flush()
        self._events.write(_frame(encode_scalar_event(now, int(step), scalars)))
        self._events.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records with step > `step`, so the files match an uninterrupted run resumed from `step`.
        The TensorBoard file is rebuilt from the kept JSONL records and replaces every older events file."""
        records = read_metrics(self.workdir)
        kept = [r for r in records if r["step"] <= step]
        tmp = self.jsonl_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._jsonl.close()
        os.replace(tmp, self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a")
        self._events.close()
        old = [os.path.join(self.tb_dir, n) for n in os.listdir(self.tb_dir) if "tfevents" in n]
        self._open_events()
        for r in kept:
            scalars = {k: v for k, v in r.items() if k not in _RESERVED}
            self._events.write(_frame(encode_scalar_event(r["time"], r["step"], scalars)))
        self._events.flush()
        for path in old:
            os.remove(path)

    def close(self) -> None:
        for f in (self._jsonl, self._events):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `workdir/metrics.jsonl`; a torn last line (killed mid-write) is ignored."""
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(s.strip() for s in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records


def format_progress(step: int, metrics: dict[str, Any]) -> str:
    """One line: step, loss, tokens/s, MFU %, lr, grad norm, expert-load imbalance (max/mean expert load).
    Reads keys loss, tokens_per_s, mfu (a fraction), lr, grad_norm, expert_load_imbalance; absent keys are left out."""
    def si(x: float) -> str:
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(x) >= scale:
                return f"{x / scale:.2f}{unit}"
        return f"{x:.1f}"

    formats = [("loss", "loss {:.4f}"), ("tokens_per_s", None), ("mfu", None), ("lr", "lr {:.3e}"),
               ("grad_norm", "gnorm {:.3f}"), ("expert_load_imbalance", "load-imb {:.2f}")]
    parts = [f"step {int(step):>7d}"]
    for key, fmt in formats:
        if key not in metrics:
            continue
        v = float(np.asarray(metrics[key]))
        if key == "tokens_per_s":
            parts.append(f"{si(v)} tok/s")
        elif key == "mfu":
            parts.append("MFU n/a" if math.isnan(v) else f"MFU {100 * v:.1f}%")
        else:
            parts.append(fmt.format(v))
    return " | ".join(parts)


def plot_losses(workdir: str | os.PathLike) -> str:
    """Plot every `*loss*` metric of metrics.jsonl against step into `workdir/losses.png`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    keys = sorted({k for r in records for k in r if "loss" in k})
    if not keys:
        raise ValueError(f"{os.path.join(os.fspath(workdir), METRICS_FILE)} has no loss records to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(os.fspath(workdir), "losses.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
