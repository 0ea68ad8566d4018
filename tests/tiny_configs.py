"""Small configs for tests that need more shapes than the tiny-a fixture."""
from ling.config import LingConfig

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, head_dim=8, layer_group_size=4, group_norm_size=2, num_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=8, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            max_position_embeddings=512, rope_theta=10000.0, initializer_range=0.2, attention_impl="reference",
            pad_token_id=0, eos_token_id=1)


def tiny_config(**overrides) -> LingConfig:
    return LingConfig(**{**TINY, **overrides})
