"""Evaluation: perplexity, answer-checked math (gsm: pass@k, cons@n), speculative decoding
(speculative: exact sampling, acceptance, block efficiency) and the CLI modes (run)."""

from distill_jax.eval.perplexity import chunk_documents, next_token_nll, perplexity
