"""Evaluation: perplexity (more in later issues: agreement, pass@k, speculative acceptance)."""

from distill_jax.eval.perplexity import chunk_documents, next_token_nll, perplexity
