"""Serving memory plan: weights, MLA latent cache, Lightning state and activations per device for a context length.

Weights are counted exactly from the model's abstract parameters (`nnx.eval_shape`), each divided by the mesh axes
of its PartitionSpec under sharding.rules (the same table `from_pretrained(mesh=...)` places them with). Caches
follow ling/cache.py: per MLA layer (kv_lora_rank + qk_rope_head_dim) values per token in the cache dtype, rounded
up to whole pages, split over the "length" axes; per Lightning layer an fp32 [H, D, D] state, split over the
"heads" axes; sequences over the "batch" axes.

Activations are the prefill peak of one chunk: the last position's fp32 logits and the chunk's layer activations,
and the per-head K/V that ling/layers/mla.py expands over the whole cache window when it prefills a chunk (the
largest term at long context). Score matrices are not counted: the Pallas flash kernels never form them.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ling.config import LingConfig
from ling.model import LingModel
from sharding import MESH_AXES, make_abstract_mesh, param_specs
from sharding.rules import mesh_axes

DEFAULT_DEVICE_GIB = 95.0  # TPU v5p HBM, when no accelerator is attached to ask
GIB = 2**30


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'tensor=2,expert=4' -> {'tensor': 2, 'expert': 4}; ValueError naming the bad entry."""
    mesh = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, size = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {name!r} in {spec!r}; axes are {MESH_AXES}")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh: axis {name} needs a positive integer size, got {item!r}")
        mesh[name] = int(size)
    return mesh


def _div(n: int, parts: int) -> int:
    return -(-n // parts)


def _abstract_mesh(mesh: dict[str, int]):
    return make_abstract_mesh(mesh, math.prod(mesh.values()))


def split(name: str, mesh: dict[str, int]) -> int:
    """How many ways the sharding rules split logical axis `name` on `mesh`."""
    amesh = _abstract_mesh(mesh)
    return math.prod(amesh.shape[a] for a in mesh_axes(name, amesh))


def weight_bytes(config: LingConfig, dtype, mesh: dict[str, int]) -> tuple[int, int]:
    """(total bytes, bytes on one device) of every model variable; Params in `dtype`, others (the fp32 expert bias)
    in their own dtype."""
    model = nnx.eval_shape(lambda: LingModel(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    amesh = _abstract_mesh(mesh)
    specs = dict(nnx.to_flat_state(param_specs(state, amesh)))
    total = per_device = 0
    for path, var in nnx.to_flat_state(state):
        itemsize = jnp.dtype(var.dtype).itemsize
        total += math.prod(var.shape) * itemsize
        spec = tuple(specs[path].get_value()) + (None,) * len(var.shape)
        parts = [math.prod(amesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())) for s in spec]
        per_device += math.prod(_div(n, k) for n, k in zip(var.shape, parts)) * itemsize
    return total, per_device


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per item; per_device fields are what one device holds."""

    context: int
    batch: int
    mesh: dict
    weights_total: int
    weights_per_device: int
    latent_per_seq: int
    latent_per_device: int
    state_per_seq: int
    state_per_device: int
    activations: dict  # term -> bytes per device
    device_bytes: int
    device_source: str
    n_mla: int
    n_lightning: int
    prefill_chunk: int

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values()) if self.mesh else 1

    @property
    def activations_per_device(self) -> int:
        return sum(self.activations.values())

    @property
    def total_per_device(self) -> int:
        return self.weights_per_device + self.latent_per_device + self.state_per_device + self.activations_per_device

    @property
    def fits(self) -> bool:
        return self.total_per_device <= self.device_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(devices=self.devices, activations_per_device=self.activations_per_device,
                 total_per_device=self.total_per_device, fits=self.fits)
        return d

    def format(self) -> str:
        g = lambda b: f"{b / GIB:.3f} GiB"
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items()) or "single device"
        rows = [("weights", g(self.weights_total), g(self.weights_per_device)),
                (f"MLA latent cache ({self.n_mla} layers)", g(self.latent_per_seq * self.batch),
                 g(self.latent_per_device)),
                (f"Lightning fp32 state ({self.n_lightning} layers)", g(self.state_per_seq * self.batch),
                 g(self.state_per_device))]
        rows += [(f"activations: {name}", "", g(b)) for name, b in self.activations.items()]
        rows.append(("total per device", "", g(self.total_per_device)))
        w = max(len(r[0]) for r in rows)
        lines = [f"memory plan: context {self.context:,} tokens x batch {self.batch}, mesh {mesh} "
                 f"({self.devices} devices)", f"{'':{w}s}  {'total':>14s}  {'per device':>14s}"]
        lines += [f"{a:{w}s}  {b:>14s}  {c:>14s}" for a, b, c in rows]
        lines.append(f"device memory {self.device_bytes / GIB:.1f} GiB ({self.device_source}): "
                     + ("fits" if self.fits else "does NOT fit"))
        return "\n".join(lines)


def device_memory() -> tuple[int, str]:
    """Memory of the first accelerator when jax can tell, else DEFAULT_DEVICE_GIB."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), dev.device_kind
    return int(DEFAULT_DEVICE_GIB * GIB), "assumed TPU v5p HBM; set --device-gib"


def memory_plan(config: LingConfig, context: int, *, batch: int = 1, mesh: dict[str, int] | None = None,
                dtype=jnp.bfloat16, page_size: int = 256, prefill_chunk: int = 2048,
                device_bytes: int | None = None) -> MemoryPlan:
    """The memory plan for `batch` sequences of `context` tokens served from `config` in `dtype` (weights, cache
    and activations) on `mesh` (axis -> size)."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    mesh = {k: v for k, v in (mesh or {}).items() if v > 1}
    c = config
    item = jnp.dtype(dtype).itemsize
    n_mla = sum(c.is_mla_layer(i) for i in range(c.num_hidden_layers))
    n_lin = c.num_hidden_layers - n_mla
    seqs = _div(batch, split("batch", mesh))
    padded = _div(context, page_size) * page_size
    window = _div(padded, split("length", mesh))
    latent_row = (c.kv_lora_rank + c.qk_rope_head_dim) * item
    latent_per_seq = n_mla * padded * latent_row
    latent_dev = seqs * n_mla * window * latent_row
    state_per_seq = n_lin * c.num_attention_heads * c.head_dim**2 * 4
    heads = _div(c.num_attention_heads, split("heads", mesh))
    state_dev = seqs * n_lin * heads * c.head_dim**2 * 4
    chunk = min(prefill_chunk, context)
    mlp_loc = _div(max(c.intermediate_size, c.moe_intermediate_size * c.num_experts_per_tok), split("mlp", mesh))
    activations = {
        "logits of the last position (fp32)": seqs * _div(c.vocab_size, split("vocab", mesh)) * 4,
        f"layer activations of a {chunk}-token chunk": chunk * item * (
            6 * c.hidden_size + 6 * heads * c.head_dim + 3 * mlp_loc),
        f"MLA prefill K/V expanded over the {window:,}-token window": window * item * (
            c.kv_lora_rank + c.qk_rope_head_dim
            + heads * (2 * c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)),
    }
    if device_bytes is None:
        device_bytes, source = device_memory()
    else:
        source = "given"
    w_total, w_dev = weight_bytes(c, dtype, mesh)
    return MemoryPlan(context=context, batch=batch, mesh=mesh, weights_total=w_total, weights_per_device=w_dev,
                      latent_per_seq=latent_per_seq, latent_per_device=latent_dev, state_per_seq=state_per_seq,
                      state_per_device=state_dev, activations=activations, device_bytes=int(device_bytes),
                      device_source=source, n_mla=n_mla, n_lightning=n_lin, prefill_chunk=chunk)
