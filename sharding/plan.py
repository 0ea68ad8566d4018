"""Capacity planner: per-device bytes of a training step of a Ling config on a TPU or GPU topology.

    python -m sharding.plan --config configs/ling-2.5-1t.yaml --topology v5p-1024 [--seq-len 4096] [--json]
    python -m sharding.plan --config configs/ling-2.5-1t.yaml --search [--seq-lens 4096 262144]

Parameters (fp32 master), gradients (fp32) and AdamW moments come from jax.eval_shape of the model and of the
optimizer's init, placed with the real rules over a jax.sharding.AbstractMesh (no devices needed). Activations are
an ANALYTIC estimate of the code's working set with every layer rematerialised (see `activation_bytes`). A layout
fits when the total is at most USABLE of the chip's HBM (the rest is left to XLA's own buffers). Without --mesh,
every layout of the given chips is tried (tensor <= 8, expert and context powers of two within one slice, fsdp the
rest and across slices, no data replicas: they only add memory); among those that fit, the one with the fewest
context x tensor splits is reported.
"""
import argparse
import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from sharding.mesh import make_abstract_mesh
from sharding.rules import DEFAULT_RULES, logical_axes_of, param_specs

GiB = 2**30
USABLE = 0.9


@dataclasses.dataclass(frozen=True)
class Chip:
    label: str
    hbm: float  # bytes per device
    name_unit: int  # the topology name counts chips x name_unit (v5p names count TensorCores)
    slice_chips: int  # chips on one fast network (ICI slice, NVLink node)
    sizes: tuple[int, ...]  # chip counts tried by --search


CHIPS = {
    "v5p": Chip("TPU v5p", 95 * GiB, 2, 6144, tuple(2**i for i in range(4, 13))),
    "v6e": Chip("TPU v6e", 32 * GiB, 1, 256, tuple(2**i for i in range(4, 9)) + tuple(256 * s for s in (2, 4, 8, 16))),
    "tpu7x": Chip("TPU7x", 192 * GiB, 1, 9216, tuple(2**i for i in range(4, 14))),
    # GPU clusters run every axis over NVLink within a node and InfiniBand across nodes: one "slice".
    "h100": Chip("H100 SXM", 80e9, 1, 2**16, tuple(2**i for i in range(3, 14))),
    "h200": Chip("H200", 141e9, 1, 2**16, tuple(2**i for i in range(3, 14))),
}


def parse_topology(name: str) -> tuple[str, int, int]:
    """'v5p-1024' (1024 TensorCores = 512 chips), '4xv6e-256', 'tpu7x-256', 'h200-64' -> (kind, chips, slices)."""
    m = re.fullmatch(r"(?:(\d+)x)?(v5p|v6e|tpu7x|h100|h200)-(\d+)", name.lower())
    if not m:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-1024, 4xv6e-256, tpu7x-256, h200-64")
    slices, kind, count = int(m.group(1) or 1), m.group(2), int(m.group(3))
    chip = CHIPS[kind]
    if count % chip.name_unit:
        raise ValueError(f"topology {name!r}: {kind} names count {chip.name_unit} units per chip")
    chips = slices * count // chip.name_unit
    if chips // slices > chip.slice_chips:
        raise ValueError(f"topology {name!r}: more than {chip.slice_chips} chips in one slice")
    return kind, chips, slices


def topology_name(kind: str, chips: int) -> str:
    """The inverse of parse_topology (multi-slice as '<slices>x<kind>-<slice size>')."""
    chip = CHIPS[kind]
    if chips > chip.slice_chips:
        return f"{chips // chip.slice_chips}x{kind}-{chip.slice_chips * chip.name_unit}"
    return f"{kind}-{chips * chip.name_unit}"


@functools.lru_cache(maxsize=None)
def abstract_state(config):
    """(params nnx.State of ShapeDtypeStructs, optimizer-state ShapeDtypeStructs) from jax.eval_shape."""
    from ling.model import LingModel  # deferred: ling imports sharding
    from trainer.optimizer import OptimizerConfig, make_optimizer

    model = nnx.eval_shape(lambda: LingModel(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    opt = jax.eval_shape(make_optimizer(OptimizerConfig()).init, nnx.to_pure_dict(params))
    return params, opt


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@functools.lru_cache(maxsize=None)
def state_bytes(config, fsdp: int, expert: int, tensor: int) -> dict:
    """Per-device bytes of params, grads and optimizer state, and of the largest layer's weights gathered over
    fsdp in bf16, under the default rules on an abstract mesh (data and context do not shard parameters)."""
    mesh = make_abstract_mesh({"fsdp": fsdp, "expert": expert, "tensor": tensor}, fsdp * expert * tensor)
    params, opt = abstract_state(config)
    specs = dict(nnx.to_flat_state(param_specs(params, mesh, DEFAULT_RULES)))
    shard, layers = {}, {}
    for path, var in nnx.to_flat_state(params):
        spec = specs[path].get_value()
        shard[tuple(map(str, path))] = size = math.prod(NamedSharding(mesh, spec).shard_shape(var.shape))
        if path[0] in ("head", "groups", "tail", "mtp"):
            names = logical_axes_of(var)
            lead = var.ndim - len(names)
            gathered = size * math.prod(mesh.shape[a] for name, e in zip(names, spec[lead:]) if name == "embed"
                                        for a in _axes(e))
            layers[path[:2]] = layers.get(path[:2], 0) + 2 * gathered / math.prod(var.shape[:lead])
    p = 4 * sum(shard.values())
    o = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt):  # Adam moments mirror the params' tree and shards
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        size = next((shard[keys[i:]] for i in range(len(keys)) if keys[i:] in shard), math.prod(leaf.shape))
        o += size * leaf.dtype.itemsize
    return {"params": p, "grads": p, "optimizer": o, "gathered_layer": max(layers.values(), default=0.0)}


def activation_bytes(config, layout: dict, seq_len: int, seqs: int = 1) -> dict:
    """ANALYTIC per-device activation bytes of one training step (bf16 activations, every layer rematerialised):
    the saved layer inputs, the largest layer's forward + backward working set, and the fp32 logits and their
    gradient. `seqs` sequences per batch shard (batch split over fsdp x expert, length over context)."""
    c, tp, cp = config, layout["tensor"], layout["context"]
    n = seqs * seq_len // cp  # tokens per device
    b, f = 2, 4
    h = c.num_attention_heads / tp
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    residuals = layers * n * c.hidden_size * b / tp  # split over tensor by the "act_embed" rule
    # Lightning: q, k, v, gate, output, normed output (bf16) + fp32 output and gate; forward values + cotangents.
    lightning = 2 * n * h * c.head_dim * (6 * b + 2 * f)
    # MLA: q and output per head; the latent gathered over the whole sequence and per-head K/V expanded from it.
    qk, whole = c.qk_nope_head_dim + c.qk_rope_head_dim, n * cp
    mla = 2 * (n * h * (qk + c.v_head_dim) * b + whole * (c.kv_lora_rank + c.qk_rope_head_dim) * b
               + whole * h * (qk + c.v_head_dim) * b)
    # MoE: a dispatch chunk's receive buffer is at most the n*k rows sent (sharding.expert_parallel.dispatch_chunks):
    # rows, regrouped rows and outputs (hidden wide), gate/up/h (expert hidden / tp wide); router logits fp32.
    rows = n * c.num_experts_per_tok
    moe = 0 if c.num_experts is None else 2 * (
        rows * (3 * c.hidden_size + 3 * c.moe_intermediate_size / tp) * b + 2 * n * c.num_experts * f
        + 3 * n * (c.num_shared_experts or 0) * c.moe_intermediate_size / tp * b)
    dense = 2 * 3 * n * c.intermediate_size / tp * b
    logits = 3 * n * c.vocab_size / tp * f
    has_dense = c.num_experts is None or c.first_k_dense_replace > 0
    working = max(lightning, mla) + max(moe, dense if has_dense else 0)
    return {"residuals": residuals, "layer_working_set": working, "logits": logits}


def memory(config, layout: dict, seq_len: int, seqs: int = 1) -> dict:
    """Per-device bytes by component for `layout`."""
    mem = dict(state_bytes(config, layout["fsdp"] * layout["context"], layout["expert"], layout["tensor"]))
    mem["gathered_layers"] = 2 * mem.pop("gathered_layer")  # FSDP: this layer's weights + the next one's in flight
    mem.update(activation_bytes(config, layout, seq_len, seqs))
    return mem


def plan(config, kind: str, chips: int, slices: int, seq_len: int, layout: dict | None = None, seqs: int = 1):
    """The memory report of `layout`, or of the preferred layout: among those that fit, the fewest context and
    tensor splits (they cost the most communication and shrink the matmuls), then the smallest total; when none
    fits, the smallest total."""
    chip = CHIPS[kind]
    reports = []
    for lay in [layout] if layout else candidate_layouts(config, chips, slices, seq_len):
        mem = memory(config, lay, seq_len, seqs)
        total = sum(mem.values())
        reports.append({"layout": lay, "bytes": mem, "total": total, "fits": total <= USABLE * chip.hbm})
    fitting = [r for r in reports if r["fits"]]
    best = (min(fitting, key=lambda r: (r["layout"]["context"] * r["layout"]["tensor"], r["layout"]["tensor"],
                                        r["total"])) if fitting else min(reports, key=lambda r: r["total"]))
    return {**best, "topology": topology_name(kind, chips), "chip": chip.label, "chips": chips, "seq_len": seq_len,
            "tokens_per_device": seqs * seq_len // best["layout"]["context"], "hbm": chip.hbm,
            "global_batch_seqs": seqs * best["layout"]["fsdp"] * best["layout"]["expert"] * best["layout"]["data"]}


def candidate_layouts(config, chips: int, slices: int, seq_len: int):
    """tensor <= 8 dividing the heads, expert and context powers of two within a slice, fsdp the rest."""
    per_slice = chips // slices
    for tp in (1, 2, 4, 8):
        for ep in (2**i for i in range(9)):
            for cp in (2**i for i in range(9)):
                inner = tp * ep * cp
                if (config.num_attention_heads % tp or (config.num_experts or 1) % ep or seq_len % cp
                        or seq_len // cp < 512 or per_slice % inner):
                    continue
                yield {"data": 1, "fsdp": chips // inner, "expert": ep, "context": cp, "tensor": tp}


def search(config, kinds, seq_lens, seqs: int = 1) -> list[dict]:
    """The smallest topology of each kind on which some layout fits, per sequence length."""
    rows = []
    for kind in kinds:
        for seq_len in seq_lens:
            for chips in CHIPS[kind].sizes:
                slices = max(1, chips // CHIPS[kind].slice_chips)
                report = plan(config, kind, chips, slices, seq_len, seqs=seqs)
                if report["fits"]:
                    rows.append(report)
                    break
            else:
                rows.append({"topology": None, "chip": CHIPS[kind].label, "seq_len": seq_len, "fits": False})
    return rows


def _layout_str(lay: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in lay.items() if v > 1) or "single device"


def format_report(r: dict) -> str:
    g = lambda x: f"{x / GiB:8.2f}"
    lines = [f"{r['topology']} ({r['chips']} x {r['chip']}, {r['hbm'] / GiB:.1f} GiB each), seq {r['seq_len']}, "
             f"{r['tokens_per_device']} tokens/device",
             f"layout: {_layout_str(r['layout'])} ({r['global_batch_seqs']} sequences per step)",
             "per device                     GiB"]
    lines += [f"  {k:26s}{g(v)}" for k, v in r["bytes"].items()]
    lines.append(f"  {'total':26s}{g(r['total'])}  of {USABLE * r['hbm'] / GiB:.1f} usable "
                 f"({r['total'] / r['hbm']:.0%} of HBM) -> {'fits' if r['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


def format_search(rows) -> str:
    lines = [f"{'chip':10s} {'seq':>7s}  {'smallest topology':18s} {'chips':>6s}  {'GiB/device':>10s}  layout"]
    for r in rows:
        if r["topology"] is None:
            lines.append(f"{r['chip']:10s} {r['seq_len']:7d}  none of the sizes tried fits")
            continue
        lines.append(f"{r['chip']:10s} {r['seq_len']:7d}  {r['topology']:18s} {r['chips']:6d}  "
                     f"{r['total'] / GiB:10.1f}  {_layout_str(r['layout'])}")
    return "\n".join(lines)


def main(argv=None):
    from ling.config import load_yaml_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/<model>.yaml")
    ap.add_argument("--topology", help="v5p-1024 (TensorCores), 4xv6e-256, tpu7x-256 (chips), h200-64 (GPUs)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=1, help="sequences per batch shard (micro-batch)")
    ap.add_argument("--mesh", help="a fixed layout, e.g. fsdp=64,expert=8 (default: the best one)")
    ap.add_argument("--search", action="store_true", help="smallest topology per chip kind")
    ap.add_argument("--kinds", nargs="+", default=list(CHIPS))
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 262144])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    config = load_yaml_config(args.config)
    if args.search:
        rows = search(config, args.kinds, args.seq_lens, args.seqs)
        print(json.dumps(rows, indent=1) if args.json else format_search(rows))
        return
    if not args.topology:
        ap.error("--topology or --search is required")
    kind, chips, slices = parse_topology(args.topology)
    layout = None
    if args.mesh:
        layout = {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
        layout.update({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
        if math.prod(layout.values()) != chips:
            ap.error(f"--mesh {args.mesh} does not multiply to {chips} chips")
    report = plan(config, kind, chips, slices, args.seq_len, layout, args.seqs)
    print(json.dumps(report, indent=1) if args.json else format_report(report))


if __name__ == "__main__":
    main()
