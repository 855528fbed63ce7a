"""A user's own data: a torch Dataset from their package (data=dataset) and folders of
images (data=image_folder), on one process and two, with exact resume and one-line errors."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from bigmodel_cli.commands.train import train
from bigmodel_cli.data.dataset import TorchDataset
from bigmodel_cli.data.image_folder import ImageFolder, find_images
from bigmodel_cli.errors import UserError
from conftest import write_image_folder


PACKAGE = '''
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Three Gaussian blobs in 8 dimensions: (features, class index)."""

    def __init__(self, n=480, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(self.y, 8).float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_dataset(n=480):
    return Blobs(n)


def three_splits():
    return Blobs(300, seed=1), Blobs(40, seed=2), Blobs(50, seed=3)


def wrong():
    return [1, 2, 3]


def empty():
    return Blobs(0)


class Unpaired(Blobs):
    def __getitem__(self, i):
        return self.x[i]


class Regression(Blobs):
    def __getitem__(self, i):
        return self.x[i], float(self.x[i].sum())


class BrokenAt5(Blobs):
    def __getitem__(self, i):
        if i == 5:
            raise OSError("cannot read sample 5")
        return super().__getitem__(i)


class Tokens(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = (torch.arange(9) + i) % 11
        return ids[:-1], ids[1:]
'''

# Dropout off and a loss record per step, so runs compare step by step.
TINY = ("model=mlp", "model.hidden_sizes=[32]", "model.dropout=0.0", "trainer.log_every=1",
        "trainer.val_every=10", "trainer.progress=plain", "trainer.threads=1")


def write_package(folder: Path, name: str = "mypkg") -> Path:
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    return folder


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package of the user's own, importable in this process under a name of this test's."""
    name = f"userdata_{tmp_path.name.replace('-', '_')}"
    write_package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def losses(run_dir: Path):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def step_losses(run_dir: Path):
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ---------------------------------------------------------------- a torch Dataset


@pytest.mark.dist
def test_a_users_dataset_trains_on_two_ranks_as_on_one(run_cli, tmp_path):
    """Acceptance 3: the user's package in the working directory, one process with batch 32
    and two ranks (gloo) with batch 16 each see the same samples at every step."""
    args = ("train", "data=dataset", "data.source=mypkg.make_dataset", *TINY, "trainer.max_steps=20",
            "trainer.device=cpu")
    one = run_cli(*args, "data.batch_size=32", cwd=write_package(tmp_path / "one"))
    assert one.returncode == 0, one.output
    two = run_cli(*args, "data.batch_size=16", "trainer.devices=2", "data.num_workers=1",
                  cwd=write_package(tmp_path / "two"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert two.returncode == 0, two.output
    a, b = losses(one.run_dir()), losses(two.run_dir())
    assert len(a) == len(b) == 20
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert y == pytest.approx(x, rel=1e-5), f"step {step}: {x} vs {y}"
    assert "task classification, input (8,), 3 classes" in one.output
    assert one.summary()["test"]["accuracy"] > 0.5  # chance is 1/3
    assert two.summary()["test"]["accuracy"] == pytest.approx(one.summary()["test"]["accuracy"])


@pytest.mark.integration
def test_a_users_dataset_resumes_exactly_inside_an_epoch(run_cli, tmp_path):
    """Dropout on and DataLoader workers: the data position and every RNG stream continue,
    so a run resumed mid-epoch logs the very losses of the uninterrupted one."""
    write_package(tmp_path)
    # 432 training samples, batch 32: 13 steps an epoch; step 20 is inside the second.
    args = ("train", "data=dataset", "data.source=mypkg.make_dataset", "data.batch_size=32", "data.num_workers=1",
            "model=mlp", "model.hidden_sizes=[32]", "model.dropout=0.3", "trainer.log_every=1",
            "trainer.val_every=15", "trainer.progress=plain", "trainer.threads=1", "trainer.max_steps=30")
    full = run_cli(*args, "trainer.checkpoint_every=20", "hydra.run.dir=full")
    assert full.returncode == 0, full.output
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000020.pt"
    resumed = run_cli(*args, f"trainer.resume={checkpoint}", "hydra.run.dir=resumed")
    assert resumed.returncode == 0, resumed.output
    reference = step_losses(tmp_path / "full")
    assert step_losses(tmp_path / "resumed") == {s: v for s, v in reference.items() if s > 20}
    test_metrics = [json.loads((tmp_path / run / "summary.json").read_text())["test"] for run in ("resumed", "full")]
    assert test_metrics[0] == test_metrics[1]


@pytest.mark.integration
def test_a_checkpoints_data_source_is_followed_only_when_trusted(run_cli, tmp_path):
    write_package(tmp_path)
    trained = run_cli("train", "data=dataset", "data.source=mypkg.make_dataset", *TINY, "trainer.max_steps=5")
    assert trained.returncode == 0, trained.output
    refused = run_cli("eval", f"ckpt={trained.run_dir()}")
    assert refused.returncode == 2
    assert "refused to follow data.source=mypkg.make_dataset" in refused.stderr
    assert "trusted_targets=[mypkg.make_dataset]" in refused.stderr
    trusted = run_cli("eval", f"ckpt={trained.run_dir()}", "trusted_targets=[mypkg.make_dataset]")
    assert trusted.returncode == 0, trusted.output
    report = json.loads((trusted.run_dir("eval") / "eval.json").read_text())
    assert report["metrics"]["loss"] == pytest.approx(trained.summary()["test"]["loss"], rel=1e-5)


@pytest.mark.unit
def test_splits_kwargs_and_the_inferred_task(user_package):
    data = TorchDataset(source=f"{user_package}.make_dataset", kwargs={"n": 200}, val_fraction=0.1,
                        test_fraction=0.2)
    data.setup()
    sizes = {name: len(d) for name, d in data.datasets.items()}
    assert sizes == {"train": 140, "val": 20, "test": 40}
    held_out = [set(data.datasets[s].indices) for s in ("train", "val", "test")]
    assert not (held_out[0] & held_out[1]) and not (held_out[0] & held_out[2]) and not (held_out[1] & held_out[2])
    assert (data.spec.task, data.spec.input_shape, data.spec.num_outputs) == ("classification", (8,), 3)

    given = TorchDataset(source=f"{user_package}.three_splits")
    given.setup()
    assert {name: len(d) for name, d in given.datasets.items()} == {"train": 300, "val": 40, "test": 50}

    regression = TorchDataset(source=f"{user_package}.Regression", batch_size=4)
    regression.setup()
    assert (regression.spec.task, regression.spec.num_outputs) == ("regression", 1)
    x, y = next(iter(regression.eval_batches("val")))
    assert x.shape == (4, 8) and y.shape == (4, 1) and y.dtype == torch.float32  # the models' output shape

    tokens = TorchDataset(source=f"{user_package}.Tokens")
    tokens.setup()
    spec = tokens.spec
    assert (spec.task, spec.input_kind, spec.vocab_size, spec.block_size) == ("language_modeling", "tokens", 11, 8)
    assert tokens.units_per_sample() == 8 and tokens.unit == "tokens"


@pytest.mark.unit
def test_each_rank_reads_a_disjoint_share_of_each_epoch(user_package):
    data = TorchDataset(source=f"{user_package}.make_dataset", batch_size=10)
    data.setup()
    shares = []
    for rank in (0, 1):
        loader = data.train_batches(seed=3, rank=rank, world_size=2)
        loader.set_epoch(2)
        shares.append({tuple(row.tolist()) for x, _ in loader for row in x})
    assert len(shares[0]) == len(shares[1]) == 210  # 432 // 2 = 216 per rank, full batches of 10
    assert not shares[0] & shares[1]
    resumed = data.train_batches(seed=3, rank=1, world_size=2)
    resumed.set_epoch(2, start=5)  # the exact resume path: batch 5 of epoch 2 on
    loader = data.train_batches(seed=3, rank=1, world_size=2)
    loader.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, list(loader)[5:]))


# ---------------------------------------------------------------- image folders


@pytest.mark.integration
def test_a_cnn_learns_a_folder_of_images(compose, tmp_path):
    """Acceptance 4: model=cnn data=image_folder on generated PNGs, decoded in workers."""
    images = write_image_folder(tmp_path / "images")
    cfg = compose("model=cnn", "model.channels=[8,16]", "model.hidden_size=32",
                  "data=image_folder", f"data.path={images}", "data.image_size=16", "data.batch_size=8",
                  "data.val_fraction=0.25", "trainer.max_steps=30", "trainer.val_every=10", "trainer.progress=plain",
                  "trainer.threads=1")
    out = train(cfg, tmp_path / "run")
    assert out["test"]["accuracy"] >= 0.9  # chance is 0.5: the colour is learnt
    data = ImageFolder(path=str(images), image_size=16, batch_size=4, num_workers=0)
    data.setup()
    assert data.spec.input_shape == (3, 16, 16) and data.spec.num_outputs == 2
    assert {name: len(d) for name, d in data.datasets.items()} == {"train": 36, "val": 4, "test": 4}
    x, y = next(iter(data.eval_batches("val")))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 2  # normalised, not raw 0..255 pixels


@pytest.mark.unit
def test_image_folder_val_path_and_grey_images(tmp_path):
    train_dir, val_dir = write_image_folder(tmp_path / "train", 6), write_image_folder(tmp_path / "val", 3)
    data = ImageFolder(path=str(train_dir), val_path=str(val_dir), image_size=8, channels=1, normalize="folder",
                       num_workers=0)
    data.setup()
    assert data.spec.input_shape == (1, 8, 8)
    assert {name: len(d) for name, d in data.datasets.items()} == {"train": 12, "val": 6, "test": 6}
    x, _ = next(iter(data.eval_batches("train", batch_size=12)))
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 2  # the folder's own statistics


# ---------------------------------------------------------------- one-line errors


def one_line_error(data) -> str:
    with pytest.raises(UserError) as caught:
        data.setup()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.unit
def test_a_source_that_gives_the_wrong_thing_is_one_line(user_package):
    message = one_line_error(TorchDataset(source=f"{user_package}.wrong"))
    assert f"data.source={user_package}.wrong gave a list of 3 (int)" in message
    assert "expected a map-style torch Dataset" in message
    message = one_line_error(TorchDataset(source=f"{user_package}.Unpaired"))
    assert "sample 0 of" in message and "is a float32 tensor of shape (8,)" in message and "(x, y) pair" in message
    assert "empty train split" in one_line_error(TorchDataset(source=f"{user_package}.empty"))
    message = one_line_error(TorchDataset(source=f"{user_package}.make_dataset", kwargs={"size": 3}))
    assert "make_dataset(size=3) failed (TypeError" in message and "data.kwargs" in message
    message = one_line_error(TorchDataset(source=f"{user_package}.make_dataset", task="regression"))
    assert "regression needs a float y" in message


@pytest.mark.unit
def test_a_label_beyond_num_classes_is_one_line_not_a_device_assert(user_package):
    data = TorchDataset(source=f"{user_package}.make_dataset", num_classes=2, num_workers=1)
    data.setup()
    with pytest.raises(UserError, match="holds label 2, outside 0..1; set data.num_classes to at least 3"):
        list(data.train_batches(seed=0))


@pytest.mark.integration
def test_a_module_that_cannot_be_imported_is_one_line(run_cli, tmp_path):
    result = run_cli("train", "data=dataset", "data.source=nosuchpkg.make_dataset", *TINY)
    assert result.returncode == 2
    assert "data.source=nosuchpkg.make_dataset cannot be imported" in result.stderr
    assert "no module named 'nosuchpkg'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("layout, expected", [
    ("missing", "is not a folder"),
    ("flat", "has no class subfolders"),
    ("no_images", "has class subfolders (cat) but no images"),
    ("one_class", "has one class subfolder (cat)"),
])
@pytest.mark.unit
def test_an_unusable_image_folder_is_one_line(tmp_path, layout, expected):
    folder = tmp_path / "images"
    if layout != "missing":
        folder.mkdir()
        (folder / "loose.png").write_bytes(b"")
    if layout in ("no_images", "one_class"):
        (folder / "cat").mkdir()
        (folder / "cat" / "notes.txt").write_text("not an image")
    if layout == "one_class":
        write_image_folder(tmp_path / "other", 1)
        (tmp_path / "other" / "red" / "00.png").rename(folder / "cat" / "00.png")
    message = one_line_error(ImageFolder(path=str(folder)))
    assert expected in message and f"data.path={folder}" in message


@pytest.mark.unit
def test_an_iterable_dataset_is_refused_in_one_line(user_package, tmp_path):
    module = tmp_path / f"{user_package}_stream.py"
    module.write_text("from torch.utils.data import IterableDataset\n\n\nclass Stream(IterableDataset):\n"
                      "    def __iter__(self):\n        yield from ()\n")
    message = one_line_error(TorchDataset(source=f"{user_package}_stream.Stream"))
    assert "gave an IterableDataset as its train split" in message and "map-style" in message


@pytest.mark.unit
def test_a_sample_that_cannot_be_read_while_counting_labels_is_one_line(user_package):
    message = one_line_error(TorchDataset(source=f"{user_package}.BrokenAt5"))
    assert "reading sample 5 of" in message and "(OSError: cannot read sample 5)" in message
    assert "fix the Dataset's __getitem__" in message


@pytest.mark.unit
@pytest.mark.parametrize("damaged,normalize", [(0, "imagenet"), (3, "folder")])
def test_a_damaged_image_is_one_line_naming_it(tmp_path, damaged, normalize):
    folder = write_image_folder(tmp_path / "images", 4)
    path = find_images(folder, "data.path")[1][damaged][0]
    Path(path).write_bytes(b"not an image")
    message = one_line_error(ImageFolder(path=str(folder), normalize=normalize, num_workers=0))
    assert "UnidentifiedImageError" in message and message.endswith(f"remove or replace the damaged image {path}")
    assert ("reading sample 0 of the image folder" if damaged == 0 else "for data.normalize=folder") in message
