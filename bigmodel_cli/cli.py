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

from bigmodel_cli.command_table import COMMANDS

USAGE = """usage: bigmodel <command> [hydra overrides...]

Commands:
{commands}

All but plot and summary are Hydra apps, each with its own config (conf/<command>.yaml; lr-find: conf/lr_find.yaml):
  bigmodel train model=cnn optim=adam optim.lr=3e-4
  bigmodel train -m optim.lr=1e-4,1e-3,1e-2      # multirun sweep
  bigmodel eval ckpt=outputs/<date>/<run>        # evaluate a run's best checkpoint
  bigmodel plot outputs/<date>/<sweep>_multirun  # curves of runs overlaid (--out plot.png)
  bigmodel summary outputs/<date>/<sweep>_multirun   # the sweep's jobs, best first
  bigmodel plan model=gpt2 trainer.devices=8 trainer.strategy=fsdp --gpu-memory 80GB
  bigmodel lr-find model=cnn                     # suggests optim.lr=... for that train command
  bigmodel prepare data.path=corpus.txt out=data/corpus   # then: train data=tokens data.dir=data/corpus
  bigmodel generate ckpt=outputs/<date>/<run> prompt="Once"
  bigmodel compress ckpt=outputs/<date>/<run> method=quantize   # or method=prune prune.amount=0.5
  bigmodel <command> --help                      # groups, options and what each key means
  bigmodel <command> --cfg job                   # print the composed config
  eval "$(bigmodel -sc install=bash)"            # tab completion of commands and overrides
"""


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
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
    importlib.import_module(COMMANDS[name].module).main()
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


def take_plan_flags(args: List[str]):
    """`--gpu-memory X` taken out of plan's arguments (Hydra would refuse it): the rest, or
    the one line saying what is wrong with it."""
    from bigmodel_cli.errors import UserError
    from bigmodel_cli.plan import gpus

    try:
        rest, gpus.REQUESTED = gpus.take_gpu_flag(args)
    except UserError as err:
        return str(err)
    return rest


def plan_sweep_overrides(name: str, args: List[str]) -> List[str]:
    """`plan -m ...` plans each job; Hydra's job folders go to scratch space, dropped at exit."""
    if name != "plan" or not ({"-m", "--multirun"} & set(args)):
        return []
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="bigmodel-plan-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.sweep.dir={scratch}"]


def dry_run_requested(args: List[str]) -> bool:
    """`trainer.dry_run=true` among train's overrides (not swept)."""
    from bigmodel_cli import preflight

    try:
        parsed = preflight.parse_command_line(args)
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(list(parsed.overrides))
    except Exception:  # Hydra reports what it cannot read
        return False
    return any(o.key_or_group == "trainer.dry_run" and not o.is_sweep_override() and o.value() is True
               for o in overrides)


#: what a shell reports for a process ended by SIGPIPE (128 + 13): `bigmodel --help | head`
EXIT_BROKEN_PIPE = 141


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return run_command(argv)
    except BrokenPipeError:  # the reader went away (| head): no traceback, nothing more to write
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run_command(argv: Optional[List[str]] = None) -> int:
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
    args = argv[1:]
    if name == "plan":
        problem = take_plan_flags(args)
        if isinstance(problem, str):
            print(f"error: {problem}", file=sys.stderr)
            return 2
        args = problem
    if COMMANDS[name].hydra:
        from bigmodel_cli import preflight

        args = preflight.expand_home(args)
        if "--help" in args or "-h" in args:
            from bigmodel_cli.help import print_help

            return print_help(name, args)
        problem = preflight.check(name, args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if name == "train" and dry_run_requested(args):
            name = "plan"  # the same plan, before Hydra makes a run dir
    module_name = COMMANDS[name].module
    # Hydra parses sys.argv itself; show it the command's own arguments only.
    sys.argv = [f"bigmodel {name}"] + args + quiet_rank_overrides() + plan_sweep_overrides(name, args)
    # A failing log handler (a full disk) must not print a traceback of its own.
    logging.raiseExceptions = False
    if name == "train":  # from the start, so that a stop signal during set-up is acted on
        from bigmodel_cli.signals import SIGNALS

        with SIGNALS.installed():
            try:
                importlib.import_module(module_name).main()
            except SystemExit:
                summarize_cut_short_sweep()
                raise
    else:
        importlib.import_module(module_name).main()
    return sweep_exit_code() if name == "train" else 0


def summarize_cut_short_sweep() -> None:
    """A sweep that ended before Hydra's end-of-sweep hook (a sweeper's own error, a stop
    signal) still gets its summary of the jobs that ran."""
    import os

    from bigmodel_cli.run_lock import SWEEP_ENV

    import json
    from pathlib import Path

    try:  # set while a sweep of this process runs
        sweep_dir = json.loads(os.environ.pop(SWEEP_ENV, "")).get("dir", "")
    except (ValueError, AttributeError):
        return
    if not sweep_dir or not os.path.isdir(sweep_dir):
        return

    from bigmodel_cli.sweep_summary import find_jobs_below, summarize

    run_dirs = find_jobs_below(Path(sweep_dir))
    if not run_dirs:  # it ended before any job ran: nothing to list
        return
    try:
        summarize(run_dirs, Path(sweep_dir))
    except Exception as err:  # noqa: BLE001 - the error that ended the sweep matters more
        print(f"warning: could not summarise the sweep in {sweep_dir}: {err}", file=sys.stderr)


def sweep_exit_code() -> int:
    """Non-zero when jobs of a sweep failed (the others ran to the end, the summary is
    written); a diverged job is a result of the sweep, not a failure."""
    summary = sys.modules.get("bigmodel_cli.sweep_summary")
    failed = summary.LAST_SWEEP_FAILED if summary is not None else []
    if not failed:
        return 0
    from bigmodel_cli.errors import EXIT_USER_ERROR

    print(f"error: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
    for job in failed:
        print(f"  {' '.join(job.overrides) or job.run_dir}: {job.reason}", file=sys.stderr)
    return EXIT_USER_ERROR
