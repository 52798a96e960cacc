"""Training: state, the jitted distillation step, rollouts (sampling in the mesh), the loop."""
