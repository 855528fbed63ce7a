import pytest
import torch

from bigmodel_cli.models.cnn import CNN
from bigmodel_cli.models.gpt import GPT
from bigmodel_cli.models.mlp import MLP
from bigmodel_cli.models.rnn import RNN
from bigmodel_cli.models.transformer import TransformerEncoder, sinusoidal_positions

pytestmark = pytest.mark.unit


def test_mlp_shapes_and_layers():
    model = MLP((1, 8, 8), 10, hidden_sizes=[32, 16], activation="gelu", dropout=0.1)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 32), (32, 16), (16, 10)]


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        MLP((4,), 2, activation="swishy")


def test_cnn_on_small_and_odd_images():
    assert CNN((1, 8, 8), 10)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    # 3 pooling blocks on a 5x5 image: pooling stops once the map is 1 pixel wide.
    assert CNN((3, 5, 5), 4, channels=[8, 8, 8])(torch.randn(2, 3, 5, 5)).shape == (2, 4)
    with pytest.raises(ValueError, match="images shaped"):
        CNN((64,), 10)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_cells(cell, bidirectional):
    model = RNN((12, 3), 2, cell=cell, hidden_size=16, num_layers=2, bidirectional=bidirectional)
    assert model(torch.randn(4, 12, 3)).shape == (4, 2)


def test_rnn_reads_images_row_by_row():
    model = RNN((1, 8, 8), 10, hidden_size=8)
    assert model.rnn.input_size == 8
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_transformer_rows_and_patches():
    rows = TransformerEncoder((1, 8, 8), 10, d_model=16, n_heads=2, n_layers=1)
    assert rows(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    patches = TransformerEncoder((1, 8, 8), 10, d_model=16, n_heads=2, n_layers=1, patch_size=4)
    assert patches.embed.in_features == 16 and patches.pos.shape[1] == 4 + 1
    assert patches(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="patches"):
        TransformerEncoder((1, 8, 8), 10, d_model=16, n_heads=2, patch_size=3)


def test_transformer_padding_mask_hides_padded_steps():
    torch.manual_seed(0)
    model = TransformerEncoder((6, 3), 2, d_model=16, n_heads=2, n_layers=2, dropout=0.0,
                               positional="sinusoidal").eval()
    x = torch.randn(1, 6, 3)
    mask = torch.tensor([[False, False, False, False, True, True]])
    changed = x.clone()
    changed[:, 4:] = 100.0  # garbage in the padded steps
    with torch.no_grad():
        a, b = model(x, padding_mask=mask), model(changed, padding_mask=mask)
        c = model(changed)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_sinusoidal_table():
    table = sinusoidal_positions(10, 8)
    assert table.shape == (1, 10, 8)
    torch.testing.assert_close(table[0, 0], torch.tensor([0.0, 1.0] * 4))


def test_gpt_shapes_tying_and_init():
    model = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    assert model(torch.randint(0, 50, (3, 16))).shape == (3, 16, 50)
    assert model.lm_head.weight is model.tok_emb.weight
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    assert proj_std == pytest.approx(0.02 / (2 * 2) ** 0.5, rel=0.2)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 50, (1, 17)))


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    idx = torch.randint(0, 20, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 20
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_gpt_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = GPT(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    for _ in range(150):
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
