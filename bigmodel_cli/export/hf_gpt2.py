"""format=hf: a model with a GPT-2 counterpart (one that maps itself, `as_gpt2()`: bigmodel's
GPT, models/gpt2_names.py) as a Hugging Face GPT2LMHeadModel folder (config.json,
model.safetensors, and tokenizer files where the tokenizer allows), loaded with
`GPT2LMHeadModel.from_pretrained(folder)`. Needs the extra `hf` (transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from bigmodel_cli.build.inference import TrainedModel
from bigmodel_cli.export.format import Format, Runner

class HuggingFaceGPT2(Format):
    name = "hf"
    extra = "hf"
    modules = ("transformers", "safetensors", "tokenizers")
    check_modules = ("transformers",)
    int8_why = "GPT2LMHeadModel's layers hold float weights only"

    def refusal(self, trained: TrainedModel, model: nn.Module) -> Optional[str]:
        target = trained.config.model.get("_target_")
        if not callable(getattr(model, "as_gpt2", None)):  # (the model's own mapping: models/gpt2_names.py)
            return (f"model._target_={target} has no GPT-2 counterpart; format=hf writes bigmodel's GPT "
                    "(model=gpt, gpt_small, gpt2) as a GPT2LMHeadModel; use format=safetensors, torchscript or onnx")
        eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
        if len(eps) != 1:
            return f"its layer norms use different eps values {sorted(eps)}; GPT-2 has one layer_norm_epsilon"
        return None

    def write(self, trained: TrainedModel, model: nn.Module, example: torch.Tensor, out: Path) -> List[str]:
        from transformers import GPT2LMHeadModel

        from transformers import GPT2Config

        config, weights = model.as_gpt2()
        hf = GPT2LMHeadModel(GPT2Config(**config))
        missing, unexpected = hf.load_state_dict(weights, strict=False)
        embedding = hf.get_input_embeddings().weight  # GPT-2's head is tied to it: not in the mapping
        tied = {name for name, tensor in hf.state_dict(keep_vars=True).items() if tensor is embedding}
        left = [k for k in missing if k not in tied]
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
