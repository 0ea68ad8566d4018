"""Tokenizer loading and offline byte-level BPE training.

The training pipeline only needs `tokenizers.Tokenizer` objects: real runs load the
released Ling `tokenizer.json` with `load_tokenizer`, the quickstart trains a small
byte-level BPE with `train_bpe` so that nothing is downloaded.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Loads a Hugging Face `tokenizer.json` file (no network access)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for bad JSON
        raise ValueError(f"{path!r} is not a valid tokenizer.json file: {e}") from e


def token_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
    """The id of `token` (e.g. EOS_TOKEN) in `tokenizer`; ValueError if it is not in the vocabulary."""
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise ValueError(f"token {token!r} is not in the tokenizer vocabulary "
                         f"(size {tokenizer.get_vocab_size()})")
    return idx


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE on `texts`, saves it to `path` and returns it.

    The vocabulary holds the 256 byte symbols, the special tokens EOS_TOKEN (id 0) and
    PAD_TOKEN (id 1), and merges up to `vocab_size` entries. Every string round-trips
    through encode/decode because the byte alphabet is always present. Training is
    deterministic for a fixed list of texts.
    """
    min_size = 256 + 2
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} must be >= {min_size} "
                         "(256 byte symbols + 2 special tokens)")
    tok = tokenizers.Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) must give back s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return tok
