"""A language model of a user's own, as the "add a model" recipe writes one: its own names
for everything, and a description of itself (bigmodel_cli/models/description.py) that is
all the engine needs to split it over tensor-parallel ranks and cut it into pipeline stages."""

import torch
from torch import nn

from bigmodel_cli.models.attention import Block
from bigmodel_cli.models.description import PipelineStages, TransformerBlocks


class ToyLM(nn.Module):
    input_kinds = ("tokens",)
    tensor_parallel = TransformerBlocks(blocks="layers", heads_key="heads", width_key="width")
    pipeline_stages = PipelineStages("layers", ("words", "places"), ("norm", "unembed"), "depth")

    def __init__(self, vocab_size: int, block_size: int, depth: int = 2, heads: int = 2, width: int = 16):
        super().__init__()
        self.words = nn.Embedding(vocab_size, width)
        self.places = nn.Embedding(block_size, width)
        self.layers = nn.ModuleList(Block(width, heads, 2, 0.0, True, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, vocab_size, bias=False)

    def stage_input(self, idx: torch.Tensor) -> torch.Tensor:
        return self.words(idx) + self.places(torch.arange(idx.shape[1], device=idx.device))

    def stage_output(self, h: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.norm(h))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.stage_input(idx)
        for layer in self.layers:
            h = layer(h)
        return self.stage_output(h)
