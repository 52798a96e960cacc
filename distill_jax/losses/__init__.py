"""Loss library: pure per-token functions, reductions explicit (see METHODS.md sections 1-5)."""

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
from distill_jax.losses.tokens import cross_entropy, entropy, log_probs, masked_sum_and_count
