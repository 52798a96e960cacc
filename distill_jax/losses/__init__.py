"""Loss library: pure per-token functions, reductions explicit (see METHODS.md sections 1-5)."""

from distill_jax.losses.compose import LossInputs, LossSpec, loss_fn, normalize, schedule_value
from distill_jax.losses.composite import composite_logits, token_adaptive_alpha
from distill_jax.losses.divergences import (
    CORES,
    DIVERGENCES,
    TAIDState,
    ab,
    akl,
    divergence,
    forward_kl,
    hellinger,
    jsd,
    multilevel_ot,
    reverse_kl,
    sinkhorn,
    skew_kl,
    skew_reverse_kl,
    taid,
    taid_init,
    taid_update,
    todi,
    tvd,
)
from distill_jax.losses.features import (
    apply_projector,
    attention_probs,
    attention_probs_from_model,
    attention_relation_kl,
    attention_transfer_mse,
    contrastive_hinge,
    hidden_cosine,
    hidden_mse,
    init_projector,
    layer_map,
    layerwise_hidden_loss,
    output_relation_kl,
    value_relation_kl,
)
from distill_jax.losses.fused import auto_chunk_size, fused_distill_loss, fused_per_token
from distill_jax.losses.preference import (
    distillm2,
    distillm2_alpha,
    dpo_margin,
    dpo_with_teacher_reference,
    listmle,
    redi_loss,
    sequence_logprobs,
    token_logprobs,
    tsd_listmle_mask,
)
from distill_jax.losses.selection import (
    AdaKDState,
    TIPQuadrants,
    adakd_init,
    adakd_review,
    adakd_token_mask,
    adakd_update,
    adaspec_delta,
    adaspec_token_mask,
    clip_per_token,
    idts_temperatures,
    masked_quantile,
    quantile_mask,
    rho1_excess_loss,
    rho1_token_mask,
    tip_entropy_mask,
    tip_entropy_sample,
    tip_quadrants,
    top_fraction_mask,
    top_k_positions,
    tsd_confidence_weights,
    tsd_entropy_penalty,
    tsd_entropy_penalty_mask,
)
from distill_jax.losses.tokens import cross_entropy, entropy, log_probs, masked_sum_and_count
from distill_jax.losses.topk import SparseTeacher, sparse_teacher, topk_divergence
