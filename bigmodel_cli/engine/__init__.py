"""The training engine: device and precision, the loop, evaluation, checkpoints."""
