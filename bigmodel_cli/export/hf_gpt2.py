"""format=hf: bigmodel's GPT as a Hugging Face GPT2LMHeadModel folder (config.json,
model.safetensors, and tokenizer files where the tokenizer allows), loaded with
`GPT2LMHeadModel.from_pretrained(folder)`. Needs the extra `hf` (transformers).

The two architectures are the same computation: pre-LN blocks, fused q/k/v, exact GELU
(GPT-2's `activation_function="gelu"`, not its default "gelu_new"), LayerNorm eps 1e-5,
attention scaled by 1/sqrt(head dim), learned positions, the LM head tied to the token
embedding. GPT-2 stores its linear layers as Conv1D, (in, out): each weight is transposed.
A GPT trained with `model.bias=false` gets zero biases, which computes the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from bigmodel_cli.engine.inference import TrainedModel
from bigmodel_cli.export.format import Format, Runner

GPT_CLASS = "bigmodel_cli.models.gpt.GPT"
#: bigmodel's name -> (GPT-2's name, transposed: a Conv1D weight)
BLOCK_NAMES = {"ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
               "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
               "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
               "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
               "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
               "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False)}
TOP_NAMES = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
             "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}


class HuggingFaceGPT2(Format):
    name = "hf"
    extra = "hf"
    modules = ("transformers", "safetensors", "tokenizers")
    check_modules = ("transformers",)
    int8_why = "GPT2LMHeadModel's layers hold float weights only"

    def refusal(self, trained: TrainedModel, model: nn.Module) -> Optional[str]:
        target = trained.config.model.get("_target_")
        if target != GPT_CLASS:
            return (f"model._target_={target} has no GPT-2 counterpart; format=hf writes bigmodel's GPT "
                    "(model=gpt, gpt_small, gpt2) as a GPT2LMHeadModel; use format=safetensors, torchscript or onnx")
        eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
        if len(eps) != 1:
            return f"its layer norms use different eps values {sorted(eps)}; GPT-2 has one layer_norm_epsilon"
        return None

    def write(self, trained: TrainedModel, model: nn.Module, example: torch.Tensor, out: Path) -> List[str]:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel(gpt2_config(model))
        missing, unexpected = hf.load_state_dict(gpt2_weights(model), strict=False)
        left = [k for k in missing if k != "lm_head.weight"]  # tied to wte
        if left or unexpected:
            raise RuntimeError(f"GPT-2 weight mapping incomplete: missing {left[:3]}, unexpected {unexpected[:3]}")
        hf.tie_weights()
        hf.save_pretrained(str(out))
        _, why = write_tokenizer(trained.checkpoint.data, out)
        self.notes.append(why)
        return sorted(p.name for p in out.iterdir())

    def runner(self, out: Path, trained: TrainedModel) -> Runner:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar for reading a few tensors
        hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
        return lambda x: hf(x).logits


def gpt2_config(model: nn.Module):
    from transformers import GPT2Config

    first = model.blocks[0]
    dropout = model.dropout.p
    return GPT2Config(vocab_size=model.tok_emb.num_embeddings, n_positions=model.block_size,
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


def write_tokenizer(data_state: dict, out: Path) -> Tuple[List[str], str]:
    """Tokenizer files for the data's tokenizer where there is a Hugging Face form of it;
    the files written and a sentence saying what they are, or why there are none."""
    tokenizer = data_state.get("tokenizer") or ({"kind": "char", "vocab": data_state["vocab"]}
                                                 if data_state.get("vocab") else None)
    kind = (tokenizer or {}).get("kind")
    if kind == "char":
        made = char_tokenizer(tokenizer["vocab"])
        why = ("tokenizer.json: the character vocabulary, one id per character (a WordLevel model that splits "
               "text into characters); AutoTokenizer.from_pretrained(folder) encodes and decodes; a character "
               "outside the vocabulary cannot be encoded")
    elif kind in ("bpe", "hf"):
        from tokenizers import Tokenizer

        made = Tokenizer.from_str(tokenizer["json"])
        why = "tokenizer.json: the run's own tokenizer; AutoTokenizer.from_pretrained(folder) loads it"
    elif kind == "byte":
        return [], "no tokenizer files: the ids are UTF-8 bytes; encode with list(text.encode()), decode with bytes(ids).decode()"
    elif kind == "gpt2":
        return [], "no tokenizer files: the ids are GPT-2's own BPE; AutoTokenizer.from_pretrained('gpt2') encodes them"
    else:
        return [], "no tokenizer files: the run's data kept no tokenizer"
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=made, clean_up_tokenization_spaces=False)
    return list(fast.save_pretrained(str(out))), why


def char_tokenizer(vocab: List[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    made = Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(vocab)}, unk_token=None))
    made.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    made.decoder = decoders.Fuse()  # characters join with nothing between them
    return made
