"""Model FLOPs per token and MFU for a LingConfig (hybrid Lightning-linear-attention / MLA MoE).

flops_per_token = m · N_active + a · A(T), with m = 6 and a = 3 for training (forward + two backward matmuls),
m = 2 and a = 1 for a forward pass; T = seq_len.

N_active: matmul weights one token passes through. The embedding lookup is a gather (excluded); lm_head is a
matmul (included). Per layer, with h = hidden, H = heads, D = head_dim:
  Lightning:  qkv h·3HD + g_proj h·HD + dense HD·h
  MLA:        q  h·H·qk (or q_a h·r_q + q_b r_q·H·qk with LoRA), kv_a h·(r_kv + rope), kv_b r_kv·H·(nope + v),
              dense H·v·h                                       (qk = nope + rope)
  dense MLP:  3·h·intermediate_size                             (layers i < first_k_dense_replace)
  MoE:        router h·E + (top_k + n_shared)·3·h·moe_intermediate_size
  MTP (training only, the reference runs it only in training; per MTP layer):
              eh_proj 2h·h + MLA + MoE + the shared lm_head h·V applied to the MTP hidden state.
Norms, RoPE, gates' sigmoid, routing and softmax are elementwise and not counted.

A(T): token-mixing FLOPs per token, forward.
  MLA, causal softmax attention, non-absorbed (training form): query t sees t+1 keys, T/2 on average.
    scores 2·H·qk·(T/2) + probs·V 2·H·v·(T/2) = 2·H·(qk + v)·T/2.
  Lightning, chunked simple-GLA with chunk C (K = V = D per head). Per chunk of C tokens and head:
    intra-chunk  (Q Kᵀ ⊙ decay) V: 2·C·C·K + 2·C·C·V (the kernel computes the full C×C block, masked);
    inter-chunk  (Q ⊙ decay) S_prev: 2·C·K·V;   state update  S += (K ⊙ decay)ᵀ V: 2·C·K·V.
    Per token: 2·H·(2·K·V + C·(K + V)).
"""
from __future__ import annotations

from ling.config import LingConfig

LIGHTNING_CHUNK = 64


def _mla_attention_params(cfg: LingConfig) -> int:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    q_out = n * cfg.qk_head_dim
    q = h * q_out if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * q_out
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    dense = n * cfg.v_head_dim * h
    return q + kv_a + kv_b + dense


def _lightning_attention_params(cfg: LingConfig) -> int:
    h, hd = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    return h * 3 * hd + h * hd + hd * h  # query_key_value, g_proj, dense


def _moe_active_params(cfg: LingConfig) -> int:
    h = cfg.hidden_size
    experts = (cfg.num_experts_per_tok + (cfg.num_shared_experts or 0)) * 3 * h * cfg.moe_intermediate_size
    return h * cfg.num_experts + experts


def active_params(cfg: LingConfig, training: bool = True) -> int:
    """Matmul weights per token (see module docstring); MTP layers are counted only when `training`."""
    h = cfg.hidden_size
    n = h * cfg.vocab_size  # lm_head
    for i in range(cfg.num_hidden_layers):
        n += _mla_attention_params(cfg) if cfg.is_mla_layer(i) else _lightning_attention_params(cfg)
        n += _moe_active_params(cfg) if cfg.is_moe_layer(i) else 3 * h * cfg.intermediate_size
    if training:
        mtp = 2 * h * h + _mla_attention_params(cfg) + _moe_active_params(cfg) + h * cfg.vocab_size
        n += cfg.num_nextn_predict_layers * mtp
    return n


def attention_flops_per_token(cfg: LingConfig, seq_len: int, training: bool = True,
                              lightning_chunk: int = LIGHTNING_CHUNK) -> float:
    """Forward token-mixing FLOPs per token averaged over a causal sequence of `seq_len` (module docstring);
    MTP layers' MLA is counted only when `training`."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    n_heads, d = cfg.num_attention_heads, cfg.head_dim
    mla = 2 * n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    lightning = 2 * n_heads * (2 * d * d + lightning_chunk * (d + d))
    n_mla = sum(cfg.is_mla_layer(i) for i in range(cfg.num_hidden_layers))
    n_lightning = cfg.num_hidden_layers - n_mla
    if training:
        n_mla += cfg.num_nextn_predict_layers
    return n_mla * mla + n_lightning * lightning


def flops_per_token(cfg: LingConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6·N_active + 3·A(T) for training, 2·N_active + A(T) for a forward pass."""
    mult = 3 if training else 1
    return mult * (2 * active_params(cfg, training) + attention_flops_per_token(cfg, seq_len, training))


def mfu(tokens_per_s: float, cfg: LingConfig, seq_len: int, peak_flops: float, n_chips: int) -> float:
    """Model FLOPs utilisation in [0, 1]: tokens_per_s (all chips together) × training flops_per_token over
    n_chips × peak_flops. Take peak_flops from `benchmarks.peaks.detect_chip().bf16_flops` (None on CPU)."""
    if not peak_flops > 0 or n_chips < 1:
        raise ValueError(f"peak_flops={peak_flops} must be > 0 and n_chips={n_chips} must be >= 1")
    return tokens_per_s * flops_per_token(cfg, seq_len, training=True) / (n_chips * peak_flops)
