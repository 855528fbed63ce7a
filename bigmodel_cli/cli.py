"""argv -> command name -> that command's Hydra app.

Kept free of torch and Hydra imports so that `bigmodel --help` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from typing import List, Optional

from bigmodel_cli import __version__

# name -> (module holding a Hydra `main`, one-line description)
COMMANDS = {
    "train": ("bigmodel_cli.commands.train", "Train a model; writes a run dir with logs, metrics and checkpoints."),
    "eval": ("bigmodel_cli.commands.eval", "Evaluate a checkpoint (ckpt=<file or run dir>) on a data split."),
    "prepare": ("bigmodel_cli.commands.prepare", "Tokenize a text corpus into memory-mapped token files (data=tokens)."),
    "generate": ("bigmodel_cli.commands.generate", "Sample text from a trained language model (ckpt=<run dir>)."),
    "plot": ("bigmodel_cli.commands.plot", "Plot loss, metric and lr curves of run dirs, overlaid (one PNG)."),
    "lr-find": ("bigmodel_cli.commands.lr_find", "LR range test on train's model and data; prints an optim.lr to use."),
}

#: the commands that are Hydra apps (plot takes plain arguments)
HYDRA_COMMANDS = ("train", "eval", "prepare", "generate", "lr-find")

USAGE = """usage: bigmodel <command> [hydra overrides...]

Commands:
{commands}

All but plot are Hydra apps, each with its own config (conf/<command>.yaml; lr-find: conf/lr_find.yaml):
  bigmodel train model=cnn optim=adam optim.lr=3e-4
  bigmodel train -m optim.lr=1e-4,1e-3,1e-2      # multirun sweep
  bigmodel eval ckpt=outputs/<date>/<run>        # evaluate a run's best checkpoint
  bigmodel plot outputs/<date>/<sweep>_multirun  # curves of runs overlaid (--out plot.png)
  bigmodel lr-find model=cnn                     # suggests optim.lr=... for that train command
  bigmodel prepare data.path=corpus.txt out=data/corpus   # then: train data=tokens data.dir=data/corpus
  bigmodel generate ckpt=outputs/<date>/<run> prompt="Once"
  bigmodel <command> --help                      # groups, options and what each key means
  bigmodel <command> --cfg job                   # print the composed config
  eval "$(bigmodel -sc install=bash)"            # tab completion of commands and overrides
"""


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def quiet_rank_overrides() -> List[str]:
    """Under torchrun or srun every rank runs Hydra. Only rank 0 may make a run dir and own
    the console; the others write nothing until they learn rank 0's run dir (and then only
    their own train_rank{k}.log)."""
    import os

    from bigmodel_cli.run_lock import quiet_rank

    if not quiet_rank():
        return []
    import atexit
    import shutil
    import tempfile

    # A multirun sweep still makes its job folders: put them in scratch space, then drop it.
    scratch = tempfile.mkdtemp(prefix=f"bigmodel-rank{os.environ.get('RANK', os.environ.get('SLURM_PROCID'))}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return ["hydra.output_subdir=null", "hydra.run.dir=.", f"hydra.sweep.dir={scratch}",
            "hydra/job_logging=quiet_rank", "hydra/hydra_logging=disabled"]


def shell_completion(argv: List[str]) -> int:
    """`bigmodel -sc install=bash` prints Hydra's completion script for `bigmodel`; the
    script then calls `bigmodel -sc query=bash` with COMP_LINE set, which we answer by
    completing a command name, or by handing the line (less the command word) to that
    command's Hydra app."""
    import os

    sys.argv = ["bigmodel", *argv]
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if any(a.startswith("query") for a in argv[1:]):
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(name for name in COMMANDS if name.startswith(prefix)))
            return 0
        if words[1] not in COMMANDS:
            return 0
        rest = line.split(words[1], 1)[1]
        os.environ["COMP_LINE"] = words[0] + rest
        os.environ["COMP_POINT"] = str(len(os.environ["COMP_LINE"]))
        name = words[1]
    else:
        name = "train"  # install/uninstall: any command's app prints the same script
    importlib.import_module(COMMANDS[name][0]).main()
    return 0


def strip_launcher_args(argv: List[str]) -> List[str]:
    """Drop --local-rank/--local_rank, which torch.distributed.launch (and torchrun with
    --no-python scripts) may add; ranks are read from the environment instead."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local-rank", "--local_rank"):
            skip = True
        elif not arg.startswith(("--local-rank=", "--local_rank=")):
            out.append(arg)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"bigmodel {__version__}")
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return shell_completion(argv)
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"error: unknown command '{name}'; {hint}commands: {', '.join(COMMANDS)} "
              "(see bigmodel --help)", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    args = argv[1:]
    if name in HYDRA_COMMANDS:
        from bigmodel_cli import preflight

        args = preflight.expand_home(args)
        if "--help" in args or "-h" in args:
            from bigmodel_cli.help import print_help

            return print_help(name, args)
        problem = preflight.check(name, args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    # Hydra parses sys.argv itself; show it the command's own arguments only.
    sys.argv = [f"bigmodel {name}"] + args + quiet_rank_overrides()
    # A failing log handler (a full disk) must not print a traceback of its own.
    logging.raiseExceptions = False
    if name == "train":  # from the start, so that a stop signal during set-up is acted on
        from bigmodel_cli.signals import SIGNALS

        with SIGNALS.installed():
            importlib.import_module(module_name).main()
    else:
        importlib.import_module(module_name).main()
    from bigmodel_cli.errors import EXIT_USER_ERROR, FAILED_JOBS

    if FAILED_JOBS:  # multirun jobs that failed; the others ran to the end
        print(f"error: {len(FAILED_JOBS)} job(s) of the sweep failed:", file=sys.stderr)
        for line in FAILED_JOBS:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
