"""Metric sinks, chosen with logger=[jsonl,csv,tensorboard,wandb]; only rank 0 has any.

Every sink gets the same records: train intervals (`train`) and evaluations (`eval`,
names already prefixed "val/" or "test/"), then `finish` with the run's hyperparameters
and final metrics. A resumed run (`resume_step` > 0) first drops what the sink holds
beyond that step, since those steps are about to be redone; a fresh start drops it all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping

from bigmodel_cli.errors import UserError


def is_redone(record: Mapping[str, Any], resume_step: int) -> bool:
    """Whether a stored record belongs to steps a run starting at `resume_step` redoes."""
    step = record.get("step", 0)
    step = int(float(step)) if step not in ("", None) else 0
    return step > resume_step or any(k.startswith("test/") and record[k] not in ("", None) for k in record)


class Sink:
    def train(self, step: int, metrics: Dict[str, float]) -> None:
        self.write({"step": step, **metrics})

    def eval(self, step: int, metrics: Dict[str, float]) -> None:
        self.write({"step": step, **metrics})

    def write(self, record: Dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, hparams: Dict[str, Any], final: Dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """One JSON object per line, flushed per record so a killed run keeps what it logged."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: Path, resume_step: int) -> None:
    """Keep the records of steps up to `resume_step`, dropping any test record and a line
    cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not is_redone(record, resume_step):
            kept.append(line + "\n")
    _replace_text(path, "".join(kept))


class CsvSink(Sink):
    """A spreadsheet-friendly table: one row per record, one column per metric. A metric
    first seen later (val/loss after the first train row) widens the header, which
    rewrites the file once."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.csv"
        rows: List[Dict[str, str]] = []
        self.columns: List[str] = ["step"]
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [row for row in reader if not is_redone(row, resume_step)]
        self._rewrite(rows)

    def _rewrite(self, rows: List[Dict[str, Any]]) -> None:
        if getattr(self, "_file", None):
            self._file.close()
        with open(self.path.with_suffix(".csv.tmp"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        self.path.with_suffix(".csv.tmp").replace(self.path)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, restval="")

    def write(self, record: Dict[str, Any]) -> None:
        new = [k for k in record if k not in self.columns]
        if new:
            self._file.close()
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows)
        self._writer.writerow(record)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Sink):
    """Scalars (train/*, val/*, test/*) and, at the end, the hyperparameters with the final
    metrics, through torch's SummaryWriter. `tensorboard --logdir outputs` shows every run."""

    def __init__(self, run_dir: Path, resume_step: int = 0, subdir: str = "tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("logger=tensorboard needs the tensorboard package: pip install tensorboard, "
                            "or choose loggers without it, e.g. logger=[jsonl,csv]") from None
        # purge_step hides events a resumed run redoes (all of them on a fresh start).
        log_dir = run_dir / subdir
        purge = resume_step + 1 if resume_step else (0 if log_dir.exists() else None)
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def train(self, step: int, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def eval(self, step: int, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, hparams: Dict[str, Any], final: Dict[str, float]) -> None:
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(plain, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """Weights & Biases, offline by default (nothing leaves the machine until `wandb sync`)."""

    def __init__(self, run_dir: Path, resume_step: int = 0, project: str = "bigmodel", mode: str = "offline"):
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs the wandb package: pip install wandb, or leave wandb out "
                            "of logger=[...]") from None
        self.run = wandb.init(project=project, mode=mode, dir=str(run_dir), name=run_dir.name,
                              id=run_dir.name.replace("/", "-"), resume="allow")

    def write(self, record: Dict[str, Any]) -> None:
        step = record.pop("step")
        self.run.log({k if "/" in k else f"train/{k}": v for k, v in record.items()}, step=step)

    def finish(self, hparams: Dict[str, Any], final: Dict[str, float]) -> None:
        self.run.config.update(hparams, allow_val_change=True)
        self.run.summary.update(final)

    def close(self) -> None:
        self.run.finish()


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
