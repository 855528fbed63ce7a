import numpy as np
import pytest
import torch

from bigmodel_cli.data.base import SequentialBatches, ShuffledBatches
from bigmodel_cli.data.digits import Digits, load_digits_arrays, read_digits_file
from bigmodel_cli.data.sine import Sine
from bigmodel_cli.data.synthetic import Synthetic
from bigmodel_cli.data.text import CharText
from bigmodel_cli.data.windows import RandomWindows, SequentialWindows
from bigmodel_cli.errors import UserError

pytestmark = pytest.mark.unit


def test_digits_read_from_scikit_learns_file_are_its_own_loaders(monkeypatch):
    from sklearn.datasets import load_digits

    ours, theirs = load_digits_arrays(), load_digits()
    assert np.array_equal(ours[0], theirs.data) and np.array_equal(ours[1], theirs.target)
    assert ours[1].dtype == theirs.target.dtype
    # Where a scikit-learn keeps the file elsewhere, its own loader gives the same arrays.
    monkeypatch.setattr("bigmodel_cli.data.digits.Path.is_file", lambda self: False)
    fallback = load_digits_arrays()
    assert np.array_equal(fallback[0], theirs.data) and np.array_equal(fallback[1], theirs.target)


@pytest.mark.parametrize("content", [b"\x1f\x8b\x08garbage", b"1,2,3\n4,5,6\n", b""])
def test_a_damaged_digits_file_is_one_line(tmp_path, content):
    damaged = tmp_path / "digits.csv.gz"
    damaged.write_bytes(content)
    with pytest.raises(UserError, match=r"digits file .* reinstall it: pip install --force-reinstall scikit-learn"):
        read_digits_file(damaged)


def test_digits_split_is_fixed_and_normalised():
    a, b = Digits(seed=0), Digits(seed=0)
    a.setup()
    b.setup()
    sizes = {k: len(x) for k, (x, _) in a.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 359
    torch.testing.assert_close(a.splits["test"][0], b.splits["test"][0])
    x_train = a.splits["train"][0]
    assert abs(x_train.mean().item()) < 1e-4 and x_train.std().item() == pytest.approx(1.0, abs=1e-3)
    assert a.spec.input_shape == (1, 8, 8) and a.spec.num_outputs == 10
    c = Digits(seed=1)
    c.setup()
    assert not torch.equal(a.splits["test"][1], c.splits["test"][1])


@pytest.mark.parametrize("shape,kind", [([16], "vector"), ([5, 3], "sequence"), ([1, 4, 4], "image")])
def test_synthetic_shapes(shape, kind):
    data = Synthetic(num_samples=200, input_shape=shape, num_classes=3)
    data.setup()
    x, y = data.splits["train"]
    assert x.shape[1:] == tuple(shape) and data.spec.input_kind == kind
    assert y.dtype == torch.long and int(y.max()) < 3


def test_synthetic_regression_is_deterministic():
    a, b = Synthetic(task="regression", num_samples=100), Synthetic(task="regression", num_samples=100)
    a.setup()
    b.setup()
    assert a.spec.task == "regression" and a.splits["val"][1].shape[1:] == (1,)
    torch.testing.assert_close(a.splits["val"][1], b.splits["val"][1])


def test_synthetic_rejects_bad_shapes():
    with pytest.raises(UserError):
        Synthetic(input_shape=[1, 2, 3, 4])


def test_sine_windows_predict_the_next_value():
    data = Sine(num_samples=100, seq_len=10, noise=0.0)
    data.setup()
    x, y = data.splits["train"]
    assert x.shape[1:] == (10, 1) and y.shape[1:] == (1,)
    assert data.spec.task == "regression"


def test_shuffled_batches_cover_each_sample_once_per_epoch():
    x = torch.arange(100).float()[:, None]
    loader = ShuffledBatches(x, torch.arange(100), batch_size=10, seed=3)
    seen_epoch0 = torch.cat([y for _, y in loader])
    assert sorted(seen_epoch0.tolist()) == list(range(100))
    again = torch.cat([y for _, y in loader])
    assert torch.equal(seen_epoch0, again)  # same epoch, same order
    loader.set_epoch(1)
    assert not torch.equal(seen_epoch0, torch.cat([y for _, y in loader]))


def test_shuffled_batches_split_disjointly_across_ranks():
    x = torch.arange(64).float()[:, None]
    shares = [torch.cat([y for _, y in ShuffledBatches(x, torch.arange(64), 8, seed=0, rank=r, world_size=2)])
              for r in range(2)]
    assert not set(shares[0].tolist()) & set(shares[1].tolist())
    assert len(shares[0]) == len(shares[1]) == 32


def test_full_batch_when_batch_exceeds_the_data():
    loader = ShuffledBatches(torch.zeros(30, 2), torch.zeros(30), batch_size=1000, seed=0)
    assert len(loader) == 1 and next(iter(loader))[0].shape[0] == 30


def test_sequential_batches_keep_the_last_partial_batch():
    batches = list(SequentialBatches(torch.zeros(25, 2), torch.arange(25), 10))
    assert [len(y) for _, y in batches] == [10, 10, 5]


def test_char_text_builtin_corpus_and_vocab_round_trip():
    data = CharText(block_size=16, batch_size=4)
    data.setup()
    assert data.spec.vocab_size == len(data.vocab) > 50
    assert sum(len(t) for t in data.tokens.values()) > 400_000
    again = CharText(block_size=16)
    again.load_state_dict(data.state_dict())
    again.setup()
    assert again.vocab == data.vocab


def test_char_text_from_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("xyz " * 50, encoding="utf-8")
    (tmp_path / ".hidden").write_bytes(b"\xff\xfe")
    single = CharText(path=str(tmp_path / "a.txt"), block_size=8)
    single.setup()
    assert "".join(single.vocab) == " dehlorw"
    folder = CharText(path=str(tmp_path), block_size=8)
    folder.setup()
    assert {"x", "y", "z"} <= set(folder.vocab)


def test_char_text_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        CharText(path=str(tmp_path / "missing.txt")).setup()
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe" * 100)
    with pytest.raises(UserError, match="not UTF-8"):
        CharText(path=str(binary)).setup()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc", encoding="utf-8")
    with pytest.raises(UserError, match="block_size"):
        CharText(path=str(tiny), block_size=8).setup()
    (tmp_path / "other.txt").write_text("QQQ " * 100, encoding="utf-8")
    data = CharText(path=str(tmp_path / "other.txt"), block_size=4)
    data.load_state_dict({"vocab": ["a", "b", " "]})
    with pytest.raises(UserError, match="vocabulary"):
        data.setup()


def test_random_windows_are_shifted_by_one_and_seeded():
    tokens = np.arange(1000)
    loader = RandomWindows(tokens, block_size=8, batch_size=4, seed=1)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 8)
    torch.testing.assert_close(y, x + 1)
    x2, _ = next(iter(RandomWindows(tokens, 8, 4, seed=1)))
    torch.testing.assert_close(x, x2)
    assert len(loader) == 1000 // 32


def test_sequential_windows_cover_the_split_once():
    tokens = np.arange(101)
    xs = torch.cat([x.flatten() for x, _ in SequentialWindows(tokens, block_size=10, batch_size=3)])
    assert xs.tolist() == list(range(100))
