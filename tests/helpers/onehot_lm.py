"""A user's language model that reads its token ids as one-hot vectors, with no nn.Embedding:
gradients cannot reach its inputs, so only the perturbation methods can explain it."""

import torch.nn.functional as F
from torch import nn


class OneHotLM(nn.Module):
    def __init__(self, vocab_size: int, block_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.head = nn.Linear(vocab_size, vocab_size)

    def forward(self, idx):
        return self.head(F.one_hot(idx, self.vocab_size).float())
