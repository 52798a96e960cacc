"""Training: state, the jitted distillation step and its builder, rollouts (sampling in the
mesh), batch sources (the regimes), checkpoints (sealed with checksums: integrity), the workdir
lock, SIGTERM handling (preemption), held-out evaluation, metrics, the loop."""
