"""Training: state, the jitted distillation step, the loop."""
