"""Training: losses, AMP policy, the D/G step, the loop, checkpoints."""
