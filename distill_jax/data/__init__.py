"""Data: tokenizers with exact token bytes, real text corpora."""

from distill_jax.data.tokenizers import Tokenizer, load_tokenizer
