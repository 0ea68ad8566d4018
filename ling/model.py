"""LingModel: embedding, the layer stack (head, scanned groups, tail), final norm, LM head and MTP layers."""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ling.block import DecoderBlock, MTPLayer
from ling.cache import DecodeCache
from ling.config import LingConfig
from ling.layers.context import ForwardContext
from ling.layers.norms import RMSNorm
from ling.layers.params import param
from ling.layers.rope import rope_table
from ling.stack import (LayerGroup, Remat, StackPlan, apply_run, apply_stacked, flat_pool, stack_modules,
                        stacked_pool)
from sharding import context_parallel


@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, vocab] float32
    cache: DecodeCache | None = None
    mtp_logits: list[jax.Array] | None = None  # one [B, T, vocab] per MTP layer
    expert_load: jax.Array | None = None  # [n_moe_layers, E] tokens per expert, MoE layers in layer order (+ MTP)
    intermediates: dict | None = None  # "hidden" [L, B, T, D]; "topk_idx" / "router_logits" [n_moe, B, T, ...] if MoE


jax.tree_util.register_dataclass(ModelOutput, data_fields=[f.name for f in dataclasses.fields(ModelOutput)],
                                 meta_fields=[])


class LingModel(nnx.Module):
    """BailingMoeV2_5ForCausalLM in Flax NNX.

    dtype is the compute dtype, param_dtype the storage dtype. remat picks what scanned layers keep for the
    backward pass; scan_layers=False unrolls the groups (same parameters, same results).
    """

    def __init__(self, config: LingConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: Remat | str = Remat.NONE, scan_layers: bool = True):
        c = config
        self.config = config
        self.dtype = dtype
        self.remat = Remat(remat)
        self.scan_layers = scan_layers
        self.plan = StackPlan.from_config(c)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.word_embeddings = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dtype=param_dtype,
                                     std=c.initializer_range)
        def run(layers):  # a run's blocks, stacked
            i = layers[0]
            return stack_modules(lambda r: DecoderBlock(c, mla=c.is_mla_layer(i), moe=c.is_moe_layer(i), rngs=r, **kw),
                                 len(layers), rngs)

        self.head = nnx.List([run(layers) for layers in self.plan.head])
        self.groups = (stack_modules(lambda r: LayerGroup(c, rngs=r, **kw), self.plan.n_groups, rngs)
                       if self.plan.n_groups else None)
        self.tail = nnx.List([run(layers) for layers in self.plan.tail])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, logical_axis="embed", param_dtype=param_dtype,
                            rngs=rngs)
        self.lm_head = (None if c.tie_word_embeddings else
                        param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dtype=param_dtype,
                              std=c.initializer_range))
        self.mtp = nnx.List([MTPLayer(c, rngs=rngs, **kw) for _ in range(c.num_nextn_predict_layers)])

    # ----- public API -----
    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_mtp_logits: bool = False):
        """input_ids [B, T] -> float32 logits [B, T, vocab]; with return_mtp_logits, (logits, [mtp logits])."""
        out = self.forward(input_ids, positions, segment_ids, return_mtp=return_mtp_logits)
        return (out.logits, out.mtp_logits) if return_mtp_logits else out.logits

    def forward(self, input_ids, positions=None, segment_ids=None, *, cache: DecodeCache | None = None,
                return_mtp: bool = False, collect: bool = False, last_logits_only: bool = False) -> ModelOutput:
        """The full forward pass.

        input_ids [B, T] int; positions [B, T] (default 0..T-1, or continuing from cache.lengths); segment_ids
        [B, T] document ids of packed rows (attention and the Lightning state never cross a change of id). With
        `cache`, the T tokens extend each cached sequence and the updated cache is returned. last_logits_only
        computes the LM head for the last position only (prefill), giving logits [B, 1, vocab].
        """
        c = self.config
        b, t = input_ids.shape
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training rows; a cached forward takes one document per row")
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # A sequence split over context shards runs in zig-zag order (balanced causal attention); hidden states go
        # back to sequence order before each LM head.
        zigzag = cache is None and context_parallel.zigzag_shards((b, t)) > 0
        to_layout = context_parallel.to_zigzag if zigzag else (lambda a: a)
        from_layout = context_parallel.from_zigzag if zigzag else (lambda a: a)
        if zigzag:
            positions = to_layout(positions)
            segment_ids = None if segment_ids is None else to_layout(segment_ids)
        cos, sin = rope_table(c, positions)
        ctx = ForwardContext(cos=cos, sin=sin, segment_ids=segment_ids,
                             lengths=None if cache is None else cache.lengths,
                             page_table=None if cache is None else cache.page_table, zigzag=zigzag)
        layers = cache.layers if cache is not None else {"head": [None] * len(self.head), "groups": None,
                                                         "tail": [None] * len(self.tail)}
        emb = jnp.take(self.word_embeddings[...], to_layout(input_ids), axis=0).astype(self.dtype)
        x, auxes = emb, []
        new_layers = {"head": [], "groups": None, "tail": []}
        run = lambda blocks, x, layer_ids, entry: apply_run(blocks, x, ctx, layer_ids, entry, collect=collect,
                                                            scan=self.scan_layers, remat=self.remat)
        for layer_ids, blocks, entry in zip(self.plan.head, self.head, layers["head"]):
            x, entry, aux = run(blocks, x, layer_ids, entry)
            new_layers["head"].append(entry)
            auxes.append(aux)
        if self.groups is not None:
            x, new_layers["groups"], aux = self._groups(x, ctx, layers["groups"], collect)
            auxes.append(aux)
        for layer_ids, blocks, entry in zip(self.plan.tail, self.tail, layers["tail"]):
            x, entry, aux = run(blocks, x, layer_ids, entry)
            new_layers["tail"].append(entry)
            auxes.append(aux)
        h = self.norm(x)
        h_seq = from_layout(h)
        logits = self._lm_head(h_seq[:, -1:] if last_logits_only else h_seq)
        loads = [a["load"] for a in auxes if "load" in a]
        mtp_logits = None
        if return_mtp and len(self.mtp):
            mtp_logits, ids = [], input_ids
            for j, layer in enumerate(self.mtp):
                ids = jnp.roll(ids, -1, axis=1).at[:, -1].set(0)
                emb_j = jnp.take(self.word_embeddings[...], to_layout(ids), axis=0).astype(self.dtype)
                h, aux = layer(emb_j, h, ctx, c.num_hidden_layers + j)
                mtp_logits.append(self._lm_head(from_layout(h)))
                loads.append(aux["load"][None])
        intermediates = None
        if collect:
            # [layers, B, T, ...] per key, back in sequence order; the router keys only with MoE layers
            intermediates = {key: jax.vmap(from_layout)(jnp.concatenate([a[key] for a in auxes if key in a]))
                             for key in ("hidden", "topk_idx", "router_logits") if any(key in a for a in auxes)}
        new_cache = None if cache is None else cache.replace(lengths=cache.lengths + t, layers=new_layers)
        return ModelOutput(logits=logits, cache=new_cache, mtp_logits=mtp_logits,
                           expert_load=jnp.concatenate(loads) if loads else None, intermediates=intermediates)

    def update_expert_bias(self, expert_load: jax.Array, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): move each MoE layer's selection bias by `rate` toward its
        under-loaded experts. expert_load [n_moe_layers, E] in `forward`'s order (MoE layers by depth, then MTP)."""
        delta = rate * jnp.sign(expert_load.mean(-1, keepdims=True) - expert_load).astype(jnp.float32)
        i = 0

        def bump(mlp, d):
            mlp.expert_bias[...] = mlp.expert_bias[...] + d

        for layer_ids, blocks in zip(self.plan.head, self.head):
            if blocks.moe:
                bump(blocks.mlp, delta[i:i + len(layer_ids)])
                i += len(layer_ids)
        if self.groups is not None and self.groups.mla.moe:
            n, g = self.plan.n_groups, self.plan.group_size
            d = delta[i:i + n * g].reshape(n, g, -1)
            if self.groups.lightning is not None:
                bump(self.groups.lightning.mlp, d[:, :g - 1])
            bump(self.groups.mla.mlp, d[:, g - 1])
            i += n * g
        for layer_ids, blocks in zip(self.plan.tail, self.tail):
            if blocks.moe:
                bump(blocks.mlp, delta[i:i + len(layer_ids)])
                i += len(layer_ids)
        for layer in self.mtp:
            if i < delta.shape[0]:
                bump(layer.block.mlp, delta[i])
                i += 1

    # ----- pieces -----
    def _lm_head(self, h_btd):
        w = self.word_embeddings[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("btd,dv->btv", h_btd.astype(self.dtype), w.astype(self.dtype)).astype(jnp.float32)

    def _groups(self, x, ctx, cache, collect):
        """The scanned groups. Lightning states travel as scanned data (small); the MLA page pools of all groups
        are one flat pool in the scan carry, each group's layer addressing its pages through a page offset, so a
        step updates the pool in place instead of copying every group's pool through the scan's outputs."""
        plan = self.plan
        n = plan.n_groups
        pool, pages = None, 0
        if cache is not None:
            pool, _, pages = flat_pool(cache["mla"])

        def body(group, carry, inp):
            x, pool = carry
            g, lightning = inp
            entry = None if pool is None else {"lightning": lightning, "mla": {**pool, "page_offset": g * pages}}
            x, entry, aux = group(x, ctx, plan.group_start + g * plan.group_size, entry, collect=collect,
                                  scan=self.scan_layers, remat=self.remat)
            if entry is None:
                return (x, None), (None, aux)
            return (x, entry["mla"]), (entry["lightning"], aux)

        (x, pool), (lightning, aux) = apply_stacked(
            self.groups, (x, pool), (jnp.arange(n), None if cache is None else cache["lightning"]), body,
            scan=self.scan_layers, remat=None)
        aux = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), aux)  # [n_groups, G, ...] -> layer order
        entries = None if cache is None else {"lightning": lightning, "mla": stacked_pool(pool, n, pages)}
        return x, entries, aux
