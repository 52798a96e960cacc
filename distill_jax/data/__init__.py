"""Data: tokenizers with exact token bytes, real text corpora."""

from distill_jax.data.chat import CHAT_FORMATS, ChatEncoding, ChatFormat, encode_chat
from distill_jax.data.sources import (
    botchan_paragraphs,
    botchan_path,
    gsm_problems,
    held_out_split,
    jsonl_documents,
    jsonl_records,
    kjv_chapters,
    split_corpus,
    text_documents,
)
from distill_jax.data.token_bytes import Tokenizer
from distill_jax.data.tokenizers import load_tokenizer

# seqio_tasks and tfds_builders import TensorFlow: import them explicitly, e.g.
# `from distill_jax.data import seqio_tasks`; they are not re-exported here.
