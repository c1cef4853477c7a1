"""Training engine: options, checkpoints, samplers, logging and the training loop."""
