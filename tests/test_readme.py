"""Every `bigmodel` example in README.md runs (issue 13): the lines of its bash blocks, in
README order, in one working directory, as a new user would type them.

Placeholders (`outputs/<date>/<run>`, `runA runB`, a time-stamped run dir) stand for the
newest matching folder at that moment; training examples get a few-step cap appended, and
a study's trials and the examples explained a small count, so that the whole README runs in
a few minutes (a later override wins in Hydra). The install
lines (`python3 -m venv ...`) are what `.ci/run` runs; the torchrun and srun lines are
tested in tests/test_distributed.py.
"""

import pytest
import re
import shlex
from pathlib import Path

from conftest import launches_workers, write_image_folder, write_user_package


README = Path(__file__).resolve().parent.parent / "README.md"
#: the Hydra plugin each launcher or sweeper example needs (optional extras)
PLUGINS = {"hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper",
           "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
           "hydra/launcher=local": "hydra_plugins.hydra_submitit_launcher"}
#: the optional package each example needs (an extra; skipped where it is not installed)
EXTRAS = {"data=hf": "datasets", "data=image_folder": "PIL", "format=onnx": "onnxscript", "format=hf": "transformers"}
CAP = ("trainer.max_steps=4", "trainer.val_every=2", "trainer.log_every=2", "trainer.eval_batches=2")
#: the same for the other sizes an example names: an Optuna study's trials, the examples explained
SIZE_CAPS = {"hydra.sweeper.n_trials=": "hydra.sweeper.n_trials=2", "num_examples=": "num_examples=4"}


#: The multi-rank examples train, on the same flags and tiny sizes, in the dist tier: devices=2
#: in tests/test_acceptance.py (the same command), tp=2 in tests/test_tensor_parallel.py and
#: pp=2 in tests/test_pipeline_parallel.py. Here each is checked and planned as written
#: (trainer.dry_run), which costs one in-process command instead of three fresh interpreters.
DRY_RUN = ("trainer.dry_run=true",)


def caps(args) -> tuple:
    """What keeps an example small: a later override wins in Hydra."""
    trains = args and args[0] == "train" and "--help" not in args and "--cfg" not in args
    if trains and launches_workers(args) and "-m" not in args:
        return DRY_RUN
    return (*(CAP if trains else ()),
            *(cap for key, cap in SIZE_CAPS.items() if any(a.startswith(key) for a in args)))


def readme_examples():
    """The `bigmodel ...` lines of README.md's bash blocks (an `exec ` in front dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("exec ")
            if line.startswith("bigmodel "):
                lines.append(line)
    return lines


def newest(paths):
    found = sorted(p for p in paths if p.is_dir())
    assert found, "the README refers to a run that no earlier example made"
    return found[-1]


def resolve(line: str, cwd: Path) -> str:
    """Stand-ins for the README's placeholders, made by the examples before this one."""
    outputs = cwd / "outputs"
    runs = lambda: sorted(p for p in outputs.glob("*/*_train") if p.is_dir())  # noqa: E731
    swaps = {
        r"outputs/\d{4}-\d\d-\d\d/[\d-]+_train\b": lambda: str(newest(runs())),
        r"outputs/<date>/<run>": lambda: str(newest(runs())),
        r"outputs/<date>/<time>_train_multirun": lambda: str(newest(outputs.glob("*/*_multirun"))),
        r"outputs/compress/<date>/<time>": lambda: str(newest(outputs.glob("compress/*/*"))),
        r"outputs/<date>": lambda: str(newest(outputs.glob("2*"))),
        r"runA runB": lambda: " ".join(str(p) for p in runs()[-2:]),
        r"runs/big/checkpoints/step_\d+\.pt": lambda: str(sorted((cwd / "runs/big/checkpoints").glob("step_*.pt"))[-1]),
        r"model=\.\.\.": lambda: "model=mlp",
    }
    for pattern, value in swaps.items():
        if re.search(pattern, line):
            line = re.sub(pattern, lambda _: value(), line)
    return line


@pytest.mark.unit
def test_the_readme_has_examples_of_every_command():
    commands = {line.split()[1] for line in readme_examples()}
    assert {"train", "eval", "prepare", "generate", "plot", "summary", "--help"} <= commands


@pytest.mark.e2e
def test_every_readme_example_runs(run_cli, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "corpus.txt").write_text("To be, or not to be, that is the question. " * 300)
    (tmp_path / "corpus.txt").write_text("ROMEO: But soft, what light through yonder window breaks? " * 300)
    write_user_package(tmp_path)
    write_user_data(tmp_path)
    write_image_folder(tmp_path / "images")  # data=image_folder data.path=images
    ran = []
    for example in readme_examples():
        if "wandb" in example and not _importable("wandb"):
            continue  # its own test: tests/test_observability.py (the wandb extra is optional)
        if "hydra/launcher=slurm" in example:
            continue  # submits to a cluster: tests/test_sweeps.py runs it on the local Slurm
        if ("hf_" in example or "transformers." in example) and not _hf_models_import():
            continue  # the hf extra is optional (tests/test_hf_models.py says why it cannot run)
        plugin = next((m for key, m in PLUGINS.items() if key in example), None)
        if plugin and not _importable(plugin):
            continue  # an optional extra that is not installed (tests/test_sweeps.py says which)
        if any(key in example and not _importable(module) for key, module in EXTRAS.items()):
            continue  # an optional extra that is not installed (its own tests say which)
        args = shlex.split(resolve(example, tmp_path), comments=True)[1:]
        result = run_cli(*args, *caps(args), env={"HOME": str(home)}, timeout=600)
        assert result.returncode == 0, f"README example failed: {example}\n{result.output[-3000:]}"
        ran.append(example)
    assert len(ran) >= 20


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write_user_data(folder: Path) -> None:
    """The data files the README's examples name: reviews.jsonl, my_saved_dataset/."""
    import json

    with (folder / "reviews.jsonl").open("w") as f:
        for i in range(64):
            good = i % 2 == 0
            f.write(json.dumps({"text": "a lovely day" if good else "a sad mess", "sentiment": "pos" if good else "neg"})
                    + "\n")
    if _importable("datasets"):
        import datasets

        lines = [f"line {i}: to be or not to be" for i in range(200)]
        datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(folder / "my_saved_dataset"))


def _hf_models_import() -> bool:
    try:
        from transformers import GPT2LMHeadModel  # noqa: F401  (imported lazily: a broken dependency shows here)
    except Exception:  # noqa: BLE001 - missing or broken, the examples cannot run
        return False
    return True
