"""bigmodel: train and evaluate PyTorch models from the command line with Hydra configs."""

__version__ = "0.1.0"
