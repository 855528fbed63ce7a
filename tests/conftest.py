from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from cli_runner import forget_user_modules, invoke

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Test tiers, and the suite's own speed check (tests/tiers.py); pytester tests that check.
pytest_plugins = ["tiers", "pytester"]


@pytest.fixture(autouse=True)
def forget_modules_made_by_the_test():
    """A test that writes a user's package (mypkg/ in its tmp_path) and imports it, or has a
    command import it, must not leave it to the next test, whose mypkg may differ."""
    before, path = set(sys.modules), list(sys.path)
    yield
    forget_user_modules(before)
    sys.path[:] = path


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores compute with one thread each, or their threads wait on
        # each other; the commands' own `trainer.threads=auto` respects OMP_NUM_THREADS.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


class CLIResult:
    def __init__(self, proc: subprocess.CompletedProcess, cwd: Path):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.cwd = cwd

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def run_dirs(self, kind: str = "train") -> List[Path]:
        pattern = "eval/*/*" if kind == "eval" else f"*/*_{kind}"  # eval: outputs/eval/<date>/<time>
        return sorted(p for p in (self.cwd / "outputs").glob(pattern) if p.is_dir())

    def run_dir(self, kind: str = "train") -> Path:
        dirs = self.run_dirs(kind)
        assert dirs, f"no {kind} run dir under {self.cwd}/outputs\n{self.output}"
        return dirs[-1]

    def summary(self) -> dict:
        return json.loads((self.run_dir() / "summary.json").read_text())


@pytest.fixture
def run_cli(tmp_path):
    """Run `bigmodel ARGS` in a fresh cwd (tmp_path by default), as a user would type it.

    In this test process through the console script's own entry point (cli.main) by
    default: the same argv handling, Hydra app, one-line errors and exit code, without
    paying a new interpreter's start-up. `process=True` starts `python -m bigmodel_cli`
    instead, for what only a process shows (a real exit, signals, what is printed before
    Python's own start-up); a command given a PYTHONPATH always runs in a process of its
    own. A command that launches ranks (trainer.devices=N) runs here too: its ranks are
    forks of the launcher's fork server (engine/launch.py), started once for this test
    process and reused by every launch after, so a rank starts without importing torch.
    What ranks print goes to the server's console, not to the result's output: assert on
    the run dir (the launcher's own lines, its one-line error say, are in the output).
    """

    def run(*args: str, cwd: Path = tmp_path, env: dict | None = None, timeout: int = 300,
            process: bool = False) -> CLIResult:
        return bigmodel(*args, cwd=cwd, env=env, timeout=timeout, process=process)

    return run


def bigmodel(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300, process: bool = False) -> CLIResult:
    """`bigmodel ARGS` in `cwd` (see run_cli): in this process unless a process is needed."""
    if process or "PYTHONPATH" in (env or {}):  # read at an interpreter's start only
        return run_in_process_of_its_own(args, cwd, env, timeout)
    return run_in_this_process(args, cwd, env)


def cli_env(env: dict | None) -> dict:
    """The environment a command runs in: this one, less the debug switches, plus `env`."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BIGMODEL_DEBUG")}
    return {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}


def launches_workers(args) -> bool:
    """`train` with trainer.devices=N (N > 1) or trainer.num_nodes starts worker processes
    (plan, lr-find, --cfg/--help and trainer.dry_run=true only read those keys)."""
    if not args or args[0] != "train" or {"--help", "-h", "--cfg", "-c"} & set(args):
        return False
    settings = dict(arg.partition("=")[::2] for arg in args)
    if settings.get("trainer.dry_run", "").strip().lower() == "true":  # the last one given wins
        return False
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("trainer.devices", "trainer.num_nodes") and value.strip() not in ("1", "auto", ""):
            return True
    return False


@pytest.fixture
def background():
    """`background(cmd, **popen_args)`: a process started in a session of its own, so that it
    and what it starts (a launcher's fork server and ranks) form one process group; what of
    that group outlives the test is killed, also when the test fails half-way."""
    started = []

    def start(cmd, **popen_args) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **popen_args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """`bigmodel train ARGS` by its arguments, each trained once for the module and its run
    dir handed to every test that asks (to read: a test that resumes one writes into a run
    dir of its own). `launcher` runs it under another launcher (torchrun's argv). The tests
    that share a run carry one xdist_group mark, so that they share one worker (and its run)."""
    done = {}

    def run(*args: str, launcher: tuple = ()) -> Path:
        if (args, launcher) not in done:
            cwd = tmp_path_factory.mktemp("run")
            env = {"CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU machine
            if launcher:
                cmd = [sys.executable, *launcher, "-m", "bigmodel_cli", "train", *args, "hydra.run.dir=run"]
                proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                                      env={**cli_env(env), "OMP_NUM_THREADS": "1"})
                assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            else:
                result = bigmodel("train", *args, "hydra.run.dir=run", cwd=cwd, env=env, timeout=600)
                assert result.returncode == 0, result.output
            done[args, launcher] = cwd / "run"
        return done[args, launcher]

    return run


def run_in_process_of_its_own(args, cwd: Path, env: dict | None, timeout: int) -> CLIResult:
    proc = subprocess.run([sys.executable, "-m", "bigmodel_cli", *args], cwd=cwd, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout)
    return CLIResult(proc, cwd)


def run_in_this_process(args, cwd: Path, env: dict | None) -> CLIResult:
    """cli.main(args) here, with its own cwd, environment, argv and stdout/stderr; the
    process-wide state a command changes (threads, logging, signal handlers, Hydra's
    singletons) is put back afterwards so that the next test starts clean."""
    code, out, err = invoke(list(args), cwd, cli_env(env))
    return CLIResult(subprocess.CompletedProcess(["bigmodel", *args], code, out, err), cwd)


def outcome_lines(stderr: str) -> List[str]:
    """The lines that tell how a command ended (the rest of stderr is the run's own log)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "stopped:", "interrupted:"))]


def compose_config(*overrides: str, config_name: str = "train"):
    """Compose a command's config in-process, exactly as `bigmodel train OVERRIDES` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bigmodel_cli.config import register_configs
    from bigmodel_cli.config_keys import command_module

    register_configs()
    command_module(config_name.replace("_", "-"))  # registers the command's own schema (eval's, ...)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose():
    """compose_config, as a fixture."""
    yield compose_config


def slurm_is_up() -> bool:
    """A Slurm cluster answers here (CI starts a one-node one: scripts/local_slurm.sh)."""
    if not shutil.which("srun") or not shutil.which("sinfo"):
        return False
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return state.returncode == 0 and any(s in state.stdout for s in ("idle", "mix", "alloc"))


#: a user's own model, as a file in their working directory would hold it (mypkg/nets.py)
MY_NET_SOURCE = """
from torch import nn


class MyNet(nn.Module):
    def __init__(self, input_shape, num_outputs, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_outputs))

    def forward(self, x):
        return self.net(x)
"""


#: a user's own data set (mypkg/data.py), as `data.source=mypkg.data.make_dataset` names it
MY_DATA_SOURCE = """
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    def __init__(self, n=500):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(self.y, 8).float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_dataset(n=500):
    return Blobs(n)
"""


def write_user_package(folder: Path) -> None:
    """mypkg/nets.py with MyNet in `folder`, as `model._target_=mypkg.nets.MyNet` names it,
    and mypkg/data.py with a Dataset (data.source=mypkg.data.make_dataset)."""
    (folder / "mypkg").mkdir()
    (folder / "mypkg" / "nets.py").write_text(MY_NET_SOURCE)
    (folder / "mypkg" / "data.py").write_text(MY_DATA_SOURCE)


def write_image_folder(folder: Path, per_class: int = 20) -> Path:
    """Tiny 16x16 PNGs in one subfolder per class (blue/, red/): the class is the colour,
    sprinkled with random pixels. For data=image_folder data.path=<folder>."""
    import random

    from PIL import Image

    rng = random.Random(0)
    for name, base in (("blue", (40, 40, 200)), ("red", (200, 40, 40))):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (16, 16), tuple(min(255, max(0, c + rng.randint(-50, 50))) for c in base))
            for _ in range(40):
                image.putpixel((rng.randrange(16), rng.randrange(16)), tuple(rng.randrange(256) for _ in range(3)))
            image.save(folder / name / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    """GPT-2's BPE ranks file (gpt2.tiktoken) for tokenizer.path= (tests/gpt2_ranks.py);
    the test skips, saying why, where it cannot be had."""
    from gpt2_ranks import find_gpt2_ranks

    path, why = find_gpt2_ranks()
    if path is None:
        pytest.skip(why)
    return path
