"""`bigmodel plan`: what a training run would need, worked out without running it.

    tracker.py   live tensor bytes during a step, by kind (parameters, gradients, ...)
    simulate.py  one training step on fake tensors (shapes only, no memory): the peak
    memory.py    per-rank memory for a strategy and world size, whether it fits a GPU
    gpus.py      GPU memory by card name, and the --gpu-memory flag
    data.py      the data's shape (vocabulary, context, samples) without loading batches
    report.py    the printed plan and the launch command
    show.py      validate a train config, plan it, print the plan (plan, train's dry run)
"""
