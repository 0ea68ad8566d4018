"""Ling 2.5 building blocks: norms, RoPE, Lightning and MLA attention, router, MoE, dense MLP."""
