"""bigmodel's GPT as GPT-2 (Hugging Face's GPT2LMHeadModel) sees it: its config and its
weights by GPT-2's names and layout (`bigmodel export format=hf` writes them).

The two architectures are the same computation: pre-LN blocks, fused q/k/v, exact GELU
(GPT-2's `activation_function="gelu"`, not its default "gelu_new"), LayerNorm eps 1e-5,
attention scaled by 1/sqrt(head dim), learned positions, the LM head tied to the token
embedding. GPT-2 stores its linear layers as Conv1D, (in, out): each weight is transposed.
A GPT trained with `model.bias=false` gets zero biases, which computes the same.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

#: bigmodel's name -> (GPT-2's name, transposed: a Conv1D weight)
BLOCK_NAMES = {"ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
               "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
               "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
               "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
               "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
               "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False)}
TOP_NAMES = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
             "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}



def gpt2_config(model: nn.Module) -> Dict[str, Any]:
    """GPT2Config's keyword arguments for this GPT."""
    first = model.blocks[0]
    dropout = model.dropout.p
    return dict(vocab_size=model.tok_emb.num_embeddings, n_positions=model.block_size,
                      n_embd=model.tok_emb.embedding_dim, n_layer=len(model.blocks), n_head=first.attn.n_heads,
                      n_inner=first.mlp.fc.out_features, activation_function="gelu",
                      layer_norm_epsilon=model.ln_f.eps, resid_pdrop=dropout, embd_pdrop=dropout,
                      attn_pdrop=first.attn.attn_dropout, bos_token_id=None, eos_token_id=None,
                      tie_word_embeddings=True)


def gpt2_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The GPT's weights by GPT-2's names and layout; zeros for biases it was built without."""
    own = model.state_dict()
    out = {hf: own[name] for name, hf in TOP_NAMES.items() if name in own}
    for i, block in enumerate(model.blocks):
        for name, (hf_name, transposed) in BLOCK_NAMES.items():
            tensor = own.get(f"blocks.{i}.{name}")
            if tensor is None:  # bias=False: the matching weight's output size, all zeros
                weight = own[f"blocks.{i}.{name.replace('.bias', '.weight')}"]
                tensor = torch.zeros(weight.shape[0], dtype=weight.dtype)
            out[f"transformer.h.{i}.{hf_name}"] = tensor.t().contiguous() if transposed else tensor
    if "transformer.ln_f.bias" not in out:
        out["transformer.ln_f.bias"] = torch.zeros_like(out["transformer.ln_f.weight"])
    return out
