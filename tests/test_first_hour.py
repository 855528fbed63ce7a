"""What a new user meets first (issue 13): one-line config mistakes with a suggestion,
`--help` that explains each key without importing torch, `~` in paths, their own model in
the working directory, no run folder left by a failed start, and the time-left estimate."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import compose_config, write_user_package

from bigmodel_cli.commands.eval import EvalConfig
from bigmodel_cli.commands.export import ExportConfig
from bigmodel_cli.commands.generate import GenerateConfig
from bigmodel_cli.commands.prepare import PrepareConfig
from bigmodel_cli.config import SCHEMAS, DistillConfig, EarlyStoppingConfig, TrainerConfig
from bigmodel_cli.help import describe_key
from bigmodel_cli.telemetry.time_left import TimeLeft, human_duration


QUICK = ("trainer.max_steps=2", "trainer.log_every=1", "trainer.val_every=2", "trainer.eval_batches=2")

MISTAKES = [
    (["+trainer.max_step=50"], "unknown key trainer.max_step; did you mean trainer.max_steps?"),
    (["trainer.max_step=50"], "unknown key trainer.max_step; did you mean trainer.max_steps?"),
    (["modle=cnn"], "unknown config group 'modle'; did you mean model=cnn?"),
    (["trainer.max_steps=abc"], "bad value for trainer.max_steps"),
    (["model=resnet"], "unknown model 'resnet'; did you mean model=cnn?"),
    (["trainer.precision=fp64"], "expected one of [fp32, bf16, fp16]"),
    (["optim.lr=1e-3,1e-2"], "add -m to run one job per value"),
    (["-m", "model=cnn,resnett"], "unknown model 'resnett'"),
    (["data.path=a(b"], "quote the value"),
    (["data.path=corpus.txt"], "it is a key of data=text"),
    (["logger=[jsonl,csvv]"], "did you mean logger=csv?"),
    (["+foo=1"], "unknown key foo"),
]


@pytest.mark.integration
@pytest.mark.parametrize("args,message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_config_mistake_is_one_line_with_a_suggestion_and_exit_2(run_cli, args, message):
    result = run_cli("train", *args)
    assert result.returncode == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not (result.cwd / "outputs").exists()  # refused before Hydra made a run dir


@pytest.mark.integration
def test_the_unknown_key_lists_the_keys_of_its_group(run_cli):
    result = run_cli("train", "+trainer.max_step=50")
    listed = result.stderr.split("keys of trainer: ")[1]
    assert all(f.name in listed for f in dataclasses.fields(TrainerConfig))


@pytest.mark.unit
def test_an_unknown_trainer_key_is_refused_by_the_app_itself_too():
    """Without the command-line check (a Hydra app called directly), validation refuses it."""
    from omegaconf import OmegaConf

    from bigmodel_cli.config_checks import validate_train_config
    from bigmodel_cli.errors import UserError

    cfg = compose_config("+trainer.max_step=50")
    with pytest.raises(UserError, match="did you mean trainer.max_steps"):
        validate_train_config(cfg)
    assert OmegaConf.select(compose_config(), "trainer.max_steps") == 2000


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["train", "eval", "prepare", "generate", "plan"])
def test_help_answers_without_torch_and_describes_each_key(command):
    probe = ("import sys\nfrom bigmodel_cli.cli import main\n"
             f"code = main(['{command}', '--help'])\n"
             "sys.exit(3 if 'torch' in sys.modules else code)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    # A key too long for the column has its description on the next line, further indented.
    lines = [(line, out[i + 1] if i + 1 < len(out) else "") for i, line in enumerate(out)
             if line.startswith("  ") and "=" in line]
    undescribed = [line for line, after in lines if len(line.split()) < 2 and "._target_=" not in line
                   and "logger." not in line and not (after.startswith(" " * 42) and after.strip())]
    assert lines and not undescribed, undescribed


@pytest.mark.integration
def test_train_help_shows_the_chosen_options_keys(run_cli):
    result = run_cli("train", "model=gpt", "--help")
    assert result.returncode == 0
    assert "[gpt]" in result.stdout
    assert "model.n_head=4" in result.stdout and "attention heads per block" in result.stdout
    assert "trainer.max_steps=2000" in result.stdout and "whichever limit comes first" in result.stdout


SCHEMA_CLASSES = sorted({s for options in SCHEMAS.values() for s in options.values()}
                        | {EvalConfig, GenerateConfig, PrepareConfig, EarlyStoppingConfig, DistillConfig, ExportConfig},
                       key=lambda s: s.__name__)


@pytest.mark.unit
@pytest.mark.parametrize("schema", SCHEMA_CLASSES, ids=lambda s: s.__name__)
def test_every_schema_key_has_a_description(schema):
    missing = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")
               and not describe_key(schema, f.name)]
    assert not missing, f"add a comment to {schema.__name__}: {missing}"


@pytest.mark.integration
def test_a_home_relative_path_works_unquoted(run_cli, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "corpus.txt").write_text("hello world, this is a tiny corpus. " * 200)
    result = run_cli("train", "model=gpt", "data=text", "data.path=~/corpus.txt", "data.block_size=16",
                     *QUICK, env={"HOME": str(home)})
    assert result.returncode == 0, result.output
    quoted = run_cli("train", "model=gpt", "data=text", "data.path='$HOME/corpus.txt'", "data.block_size=16",
                     *QUICK, env={"HOME": str(home)})
    assert quoted.returncode == 0, quoted.output


@pytest.mark.integration
def test_a_model_in_the_working_directory_is_found(run_cli, tmp_path):
    write_user_package(tmp_path)
    result = run_cli("train", "model=custom", "model._target_=mypkg.nets.MyNet", "+model.width=4", *QUICK)
    assert result.returncode == 0, result.output
    missing = run_cli("train", "model=custom", "model._target_=otherpkg.nets.MyNet", *QUICK)
    assert missing.returncode == 2 and "neither on sys.path nor in the working directory" in missing.stderr


@pytest.mark.dist
def test_a_failed_start_leaves_no_run_folder_but_keeps_earlier_runs(run_cli):
    earlier = run_cli("train", *QUICK)
    assert earlier.returncode == 0, earlier.output
    before = sorted(p.relative_to(earlier.cwd) for p in (earlier.cwd / "outputs").rglob("*"))
    for args in (["model=gpt"], ["data=text", "data.path=/no/such/file"], ["trainer.devices=2", "model=gpt"],
                 ["trainer.resume=/no/such/ckpt.pt"]):
        failed = run_cli("train", *args, *QUICK)
        assert failed.returncode == 2, failed.output
    after = sorted(p.relative_to(earlier.cwd) for p in (earlier.cwd / "outputs").rglob("*"))
    assert after == before


@pytest.mark.integration
def test_eval_prepare_and_generate_leave_no_dated_folders(run_cli, tmp_path):
    (tmp_path / "corpus.txt").write_text("abc def ghi " * 300)
    assert run_cli("eval", "ckpt=/no/such/run").returncode == 2
    assert not (tmp_path / "outputs").exists()
    prepared = run_cli("prepare", "data.path=corpus.txt", "out=tok")
    assert prepared.returncode == 0, prepared.output
    assert (tmp_path / "tok" / "train.bin").is_file() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / ".hydra").exists() and not list(tmp_path.glob("*.log"))


@pytest.mark.unit
def test_the_time_left_follows_the_recent_pace():
    estimate = TimeLeft(window=2)
    for step, now in ((1, 0.0), (11, 1.0), (21, 2.0)):  # 0.1 s per step
        estimate.mark(step, now)
    assert estimate.seconds(121) == pytest.approx(10.0)
    for step, now in ((31, 12.0), (41, 22.0)):  # the machine got 10x slower
        estimate.mark(step, now)
    assert estimate.seconds(121) == pytest.approx(80.0)
    assert TimeLeft().seconds(100) is None
    assert human_duration(42) == "42s" and human_duration(252) == "4m12s" and human_duration(3 * 3600 + 300) == "3h05m"


@pytest.mark.unit
def test_only_a_run_dir_this_start_made_and_never_trained_in_is_cleared(tmp_path, monkeypatch):
    from bigmodel_cli import failed_start, run_lock

    monkeypatch.chdir(tmp_path)
    fresh = tmp_path / "outputs" / "day" / "run"
    run_lock._from_hydra_callback(fresh)  # as Hydra's callback does, before the dir exists
    try:
        fresh.mkdir(parents=True, exist_ok=True)  # the lock made it already
        (fresh / "train.log").write_text("log")
        (fresh / "tensorboard").mkdir()
        failed_start.training_began(fresh)
        failed_start.discard_failed_start(fresh)
        assert fresh.is_dir()  # training had begun: its logs stay
        failed_start.training_began(fresh, False)
        failed_start.discard_failed_start(fresh)
        assert not fresh.exists() and not (tmp_path / "outputs").exists()  # the parents it made too
    finally:
        run_lock.release(fresh)
    older = tmp_path / "older"
    older.mkdir()
    (older / "train.log").write_text("an earlier start's log")
    run_lock._from_hydra_callback(older)
    try:
        failed_start.discard_failed_start(older)
        assert (older / "train.log").is_file()  # it existed before this start
    finally:
        run_lock.release(older)


@pytest.mark.integration
def test_a_run_that_fails_after_training_began_keeps_its_dir(run_cli):
    result = run_cli("train", "optim=sgd", "optim.lr=1e12", "trainer.grad_clip=null", "trainer.save_checkpoints=false",
                     "logger=[]", "trainer.max_steps=30", "trainer.log_every=5", "trainer.val_at_start=false")
    assert result.returncode == 2 and "non-finite" in result.stderr, result.output
    assert (result.run_dir() / "train.log").is_file()


# --------------------------------------------------------------- early stopping (issue 14)


@pytest.mark.unit
def test_the_monitor_counts_validations_without_enough_improvement():
    from bigmodel_cli.engine.tasks import Classification
    from bigmodel_cli.engine.trainer import Monitor

    monitor = Monitor("val/loss", "auto", Classification(), min_delta=0.1)
    for step, loss in ((1, 1.0), (2, 0.95), (3, 0.92), (4, 0.5), (5, 0.45)):
        monitor.update({"loss": loss, "accuracy": 0.0}, step)
    assert monitor.best == 0.45 and monitor.best_step == 5  # the best still follows every gain
    assert monitor.stale == 1  # 0.45 is not 0.1 better than 0.5, the last real improvement
    again = Monitor("val/loss", "auto", Classification(), min_delta=0.1)
    again.load_state_dict(monitor.state_dict())
    assert (again.stale, again.reference, again.best) == (1, 0.5, 0.45)
    old = Monitor("val/loss", "auto", Classification())
    old.load_state_dict({"metric": "val/loss", "value": 0.3, "step": 7})  # a checkpoint from before
    assert (old.stale, old.reference) == (0, 0.3)


ES = ("scheduler=constant", "trainer.val_every=10", "trainer.log_every=10", "trainer.eval_batches=2",
      "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=10", "trainer.val_at_start=false")


@pytest.mark.integration
def test_early_stopping_ends_a_stalled_run_and_its_resume_is_exact(run_cli):
    whole = run_cli("train", *ES, "trainer.max_steps=100", "hydra.run.dir=whole")
    assert whole.returncode == 0, whole.output
    summary = json.loads((whole.cwd / "whole" / "summary.json").read_text())
    assert summary["steps"] == 30 and "has not improved by more than 10 in 2 validations" in summary["early_stop"]
    assert "ended early" in (whole.cwd / "whole" / "report.md").read_text()
    first = run_cli("train", *ES, "trainer.max_steps=20", "hydra.run.dir=part")  # stale 1 at its end
    assert first.returncode == 0, first.output
    resumed = run_cli("train", *ES, "trainer.max_steps=100", "hydra.run.dir=rest",
                      "trainer.resume=part/checkpoints/last.pt")
    assert resumed.returncode == 0, resumed.output
    again = json.loads((resumed.cwd / "rest" / "summary.json").read_text())
    assert again["steps"] == 30 and again["test"] == summary["test"] and again["final_val"] == summary["final_val"]


@pytest.mark.integration
def test_bad_early_stopping_settings_are_one_line(run_cli):
    for bad, message in (("trainer.early_stopping.patience=0", "trainer.early_stopping.patience must be > 0"),
                         ("trainer.early_stopping.min_delta=-1", "min_delta must be >= 0"),
                         ("trainer.early_stopping.patient=3", "did you mean trainer.early_stopping.patience?")):
        result = run_cli("train", bad)
        assert result.returncode == 2 and message in result.stderr, result.output
