"""Run `bigmodel ARGS`, but SIGKILL this process halfway through writing its Nth checkpoint
(N from KILL_AT_SAVE): what a node failure or `kill -9` does at the worst moment."""

import io
import os
import signal
import sys

import torch

from bigmodel_cli.cli import main

real_save = torch.save
saves = 0


def save_then_die_midway(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves < int(os.environ["KILL_AT_SAVE"]):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = save_then_die_midway
sys.exit(main(sys.argv[1:]))
