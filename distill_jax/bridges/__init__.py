"""Cross-tokenizer distillation: bytes, chunks, ALM, ULD, MinED, DSKD, vocab maps (METHODS.md 6)."""

from distill_jax.bridges.align import ChunkCollator, align_chunks, chunk_ids, word_chunks
from distill_jax.bridges.alm import (
    alm_loss,
    binary_distance,
    boundary_vocab_mask,
    chunk_logprobs,
    chunk_mask,
    merge_chunks_by_boundary_prob,
    token_and_boundary_logprobs,
)
from distill_jax.bridges.byte_lm import (
    END_OF_TEXT,
    TokenIndex,
    byte_prefix_logprob,
    ensemble_next_byte_logprobs,
    jax_lm,
    next_byte_logprobs,
)
from distill_jax.bridges.byteify import (
    SPECIAL_ROLES,
    ByteView,
    byteify_pair,
    check_byte_exact,
    placeholder,
    special_roles,
)
from distill_jax.bridges.dskd import (
    DSKDTerms,
    cma_attention,
    cma_terms,
    dskd_objective,
    init_dskd,
    same_vocab_terms,
)
from distill_jax.bridges.mined import (
    edit_distances,
    mined_forward_kl,
    mined_map,
    mined_teacher_logits,
    nearest_by_edit_distance,
)
from distill_jax.bridges.uld import first_valid_positions, sorted_l1, uld_loss
from distill_jax.bridges.vocab_map import (
    check_same_tokenizer_padding,
    coverage,
    exact_match_map,
    mapped_kl,
    padded_vocab_mask,
)
