"""Training: state, the jitted distillation step and its builder, rollouts (sampling in the
mesh), batch sources (the regimes), checkpoints, held-out evaluation, metrics, the loop."""
