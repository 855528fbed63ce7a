"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML file in ``conf/<group>/`` starts from one of these schemas
(``defaults: [/schema/<group>/<name>@_here_]``), so Hydra rejects a typo'd key or a
value of the wrong type before anything runs. Value checks that types cannot express
(a positive learning rate, say) live in :func:`validate_train_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bigmodel_cli.command_table import config_name


class Choice(str, Enum):
    """One of a key's allowed values: equal to, and printed as, its string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class MonitorMode(Choice):
    auto = "auto"  # max for accuracy-like metrics, min for everything else
    min = "min"
    max = "max"


class ProgressMode(Choice):
    auto = "auto"  # a rich bar on a terminal, one plain line per interval otherwise
    bar = "bar"
    plain = "plain"


class Strategy(Choice):
    ddp = "ddp"  # DistributedDataParallel: a full replica per rank
    fsdp = "fsdp"  # FSDP2 fully_shard per repeated block and at the root; sharded checkpoints


class Backend(Choice):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class NonFinite(Choice):
    stop = "stop"  # end the run with a message; the last good checkpoint stays as it is
    skip = "skip"  # drop that step's update and go on (one host sync per step)


class RNNCell(Choice):
    rnn = "rnn"
    lstm = "lstm"
    gru = "gru"


class Positional(Choice):
    learned = "learned"
    sinusoidal = "sinusoidal"


class SyntheticTask(Choice):
    classification = "classification"
    regression = "regression"


# --------------------------------------------------------------------------- models
# Data-dependent sizes (input shape, number of outputs, vocabulary, context length)
# are not config: the train command passes them from the data set.


@dataclass
class MLPConfig:
    _target_: str = "bigmodel_cli.models.mlp.MLP"
    hidden_sizes: List[int] = field(default_factory=lambda: [256, 128])  # widths of the hidden layers, input to output
    activation: str = "relu"  # relu | gelu | tanh | silu | sigmoid
    dropout: float = 0.1  # dropout probability after each hidden layer


@dataclass
class CNNConfig:
    _target_: str = "bigmodel_cli.models.cnn.CNN"
    # output channels of each conv block (conv, norm, activation, 2x2 pooling)
    channels: List[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3  # side of the square convolution kernels
    batch_norm: bool = True  # batch norm after each convolution
    hidden_size: int = 128  # width of the fully connected layer before the output
    dropout: float = 0.2  # dropout probability before the output layers


@dataclass
class RNNConfig:
    _target_: str = "bigmodel_cli.models.rnn.RNN"
    cell: RNNCell = RNNCell.lstm  # the recurrent cell
    hidden_size: int = 128  # width of the hidden state
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # read the sequence both ways (classification)
    dropout: float = 0.0  # dropout between stacked layers


@dataclass
class TransformerConfig:
    _target_: str = "bigmodel_cli.models.transformer.TransformerEncoder"
    d_model: int = 64  # width of the token vectors
    n_heads: int = 4  # attention heads per layer (must divide d_model)
    n_layers: int = 2  # encoder layers
    mlp_ratio: int = 4  # MLP width as a multiple of d_model
    dropout: float = 0.1  # dropout probability in attention and MLP
    positional: Positional = Positional.learned  # position encoding
    # None feeds an image as a sequence of rows; an int cuts it into square patches.
    patch_size: Optional[int] = None


@dataclass
class GPTConfig:
    _target_: str = "bigmodel_cli.models.gpt.GPT"
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block (must divide n_embd)
    n_embd: int = 128  # width of the token vectors
    dropout: float = 0.0  # dropout probability (0 for short runs, 0.1-0.2 against overfitting)
    bias: bool = True  # biases in the linear layers and layer norms
    # Recompute each block's activations in the backward pass: less memory, ~30% more compute.
    activation_checkpointing: bool = False


@dataclass
class HFModelConfig:
    """A Hugging Face transformers model (bigmodel_cli/models/hf.py; the `hf` extra)."""

    _target_: str = MISSING
    # What to build: a transformers model type (gpt2, llama, bert, ...), a config class
    # (GPT2Config), or a local folder with config.json (and the weights, for pretrained=true).
    source: str = MISSING
    # Load the weights from the local folder `source` (never downloads); false: random init.
    pretrained: bool = False
    n_layer: int = 2  # blocks of a randomly initialised model (a pretrained one keeps its own)
    n_head: int = 2  # attention heads of a randomly initialised model
    n_embd: int = 64  # width of a randomly initialised model (its MLP is 4x as wide)
    # Other settings of the transformers config, by its own names, e.g. +model.config.attn_pdrop=0.0
    config: Dict[str, Any] = field(default_factory=dict)
    # Recompute each block's activations in the backward pass: less memory, ~30% more compute.
    activation_checkpointing: bool = False


@dataclass
class HFCausalLMConfig(HFModelConfig):
    _target_: str = "bigmodel_cli.models.hf.causal_lm"
    source: str = "gpt2"


@dataclass
class HFClassifierConfig(HFModelConfig):
    _target_: str = "bigmodel_cli.models.hf.sequence_classifier"
    source: str = "bert"


# ----------------------------------------------------------------------- optimizers
# `_partial_` because the parameters are only known at run time; `_convert_: all` so
# torch receives plain lists and tuples (checkpoints must not pickle OmegaConf nodes).


@dataclass
class OptimConfig:
    _target_: str = MISSING
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = 1e-3  # peak learning rate (the scheduler scales it per step)
    weight_decay: float = 0.0  # L2 penalty (adamw: decoupled, on matrices and embeddings only)


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    momentum: float = 0.0  # momentum factor (0: plain SGD)
    dampening: float = 0.0  # dampening of the momentum
    nesterov: bool = False  # Nesterov momentum


@dataclass
class MomentumConfig(SGDConfig):
    lr: float = 0.05
    momentum: float = 0.9


@dataclass
class AdamConfig(OptimConfig):
    _target_: str = "torch.optim.Adam"
    # decay rates of the first and second moment estimates
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8  # added to the denominator for stability


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.01


@dataclass
class AdagradConfig(OptimConfig):
    _target_: str = "torch.optim.Adagrad"
    lr: float = 0.01
    lr_decay: float = 0.0  # learning-rate decay per step
    eps: float = 1e-10  # added to the denominator for stability


@dataclass
class RMSpropConfig(OptimConfig):
    _target_: str = "torch.optim.RMSprop"
    alpha: float = 0.99  # smoothing constant of the squared-gradient average
    eps: float = 1e-8  # added to the denominator for stability
    momentum: float = 0.0  # momentum factor


# -------------------------------------------------------------------- LR schedules


@dataclass
class ScheduleConfig:
    _target_: str = MISSING
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps


@dataclass
class ConstantScheduleConfig(ScheduleConfig):
    _target_: str = "bigmodel_cli.optim.Constant"


@dataclass
class StepScheduleConfig(ScheduleConfig):
    _target_: str = "bigmodel_cli.optim.StepDecay"
    step_size: int = 500  # optimizer steps between decays
    gamma: float = 0.5  # learning-rate factor at each decay


@dataclass
class ExponentialScheduleConfig(ScheduleConfig):
    _target_: str = "bigmodel_cli.optim.Exponential"
    gamma: float = 0.999  # learning-rate factor per optimizer step


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    _target_: str = "bigmodel_cli.optim.Cosine"
    warmup_steps: int = 100  # linear warmup from 0 over this many optimizer steps
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of optim.lr


@dataclass
class TorchCosineScheduleConfig(ScheduleConfig):
    """Any torch.optim.lr_scheduler class works like this one: scheduler._target_=<its path>,
    its own arguments as +scheduler.<name>=<value>, and bigmodel's warmup_steps in front."""

    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    T_max: Optional[int] = None  # optimizer steps from optim.lr down to eta_min (null: the rest of the run)
    eta_min: float = 0.0  # the lowest learning rate (an absolute value, not a fraction of optim.lr)


# ---------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    _target_: str = MISSING
    # Samples per optimizer micro-step (tokens: windows per step). A batch at least as large
    # as the training split is full-batch training.
    batch_size: int = 64


@dataclass
class SplitDataConfig(DataConfig):
    """Data that bigmodel splits itself: the shares of validation and test samples."""

    val_fraction: float = 0.1  # share of samples held out for validation
    test_fraction: float = 0.1  # share of samples held out for the final test


@dataclass
class DigitsConfig(SplitDataConfig):
    _target_: str = "bigmodel_cli.data.digits.Digits"
    seed: int = 0  # draws the fixed train/val/test split
    test_fraction: float = 0.2  # share of samples held out for the final test


@dataclass
class SyntheticConfig(SplitDataConfig):
    _target_: str = "bigmodel_cli.data.synthetic.Synthetic"
    seed: int = 0  # draws the data, hence also the split
    task: SyntheticTask = SyntheticTask.classification  # classification or regression targets
    num_samples: int = 4096  # samples drawn in all (before the split)
    # [features] for vectors, [steps, features] for sequences, [C, H, W] for images.
    input_shape: List[int] = field(default_factory=lambda: [32])
    num_classes: int = 4  # classes (classification) or outputs (regression)
    noise: float = 1.0  # standard deviation of the noise added to the inputs


@dataclass
class SineConfig(SplitDataConfig):
    _target_: str = "bigmodel_cli.data.sine.Sine"
    seed: int = 0  # draws the waves, hence also the split
    num_samples: int = 4096  # windows drawn in all (before the split)
    seq_len: int = 32  # time steps per window; the target is the next value
    noise: float = 0.05  # standard deviation of the noise added to the waves


@dataclass
class TextConfig(SplitDataConfig):
    _target_: str = "bigmodel_cli.data.text.CharText"
    # A UTF-8 file or a folder of them; None uses the Python docs that ship with Python.
    path: Optional[str] = None
    block_size: int = 64  # characters of context per sample
    batch_size: int = 12  # windows per optimizer micro-step
    val_fraction: float = 0.05  # share of the text held out for validation (its end)
    test_fraction: float = 0.05  # share of the text held out for the final test


@dataclass
class TokensConfig(DataConfig):
    _target_: str = "bigmodel_cli.data.tokens.TokenFiles"
    # A folder with train.bin and val.bin (and test.bin), e.g. from bigmodel prepare.
    dir: Optional[str] = None
    block_size: int = 64  # tokens of context per sample
    batch_size: int = 12  # windows per optimizer micro-step
    dtype: Optional[str] = None  # uint16 | uint32; null: from meta.json, else uint16
    vocab_size: Optional[int] = None  # null: from meta.json (or a nanoGPT folder's meta.pkl)
    # Training batches built this many ahead in a background thread (0: off); null: 2 on
    # CUDA, 0 on CPU, where the thread would compete with the compute threads.
    prefetch: Optional[int] = None


@dataclass
class HFDataConfig(DataConfig):
    _target_: str = "bigmodel_cli.data.hf.HFData"
    path: Optional[str] = None  # a folder written by datasets' save_to_disk (or give data.files)
    # Local files, read by extension (.parquet, .jsonl/.json, .csv, .txt): one file, a list,
    # or {train: ..., validation: ..., test: ...}.
    files: Optional[Any] = None
    text_column: str = "text"  # the column holding the text
    label_column: Optional[str] = None  # classification labels; null: language modelling on the text
    # byte | char | bpe (fitted on the data's text) | gpt2 | hf (made elsewhere: see data.tokenizer_path)
    tokenizer: str = "byte"
    tokenizer_path: Optional[str] = None  # gpt2: a gpt2.tiktoken ranks file; hf: a tokenizer.json
    block_size: int = 128  # tokens per text (cut or padded) or per language-model window
    batch_size: int = 16
    val_fraction: float = 0.1  # held out from train when the data has no validation split
    seed: int = 0  # draws that held-out share
    cache_dir: Optional[str] = None  # token cache; null: ~/.cache/bigmodel/hf-tokens


@dataclass
class DatasetSplitsConfig(DataConfig):
    """A torch Dataset read through a DataLoader, with splits held out of it when not given."""

    val_fraction: float = 0.1  # share of samples held out for validation when no val split is given
    # Share held out for the final test; null: the test metrics are the validation split's.
    test_fraction: Optional[float] = None
    seed: int = 0  # draws the held-out samples
    num_workers: int = 0  # DataLoader worker processes that read samples (0: the main process)


@dataclass
class DatasetConfig(DatasetSplitsConfig):
    _target_: str = "bigmodel_cli.data.dataset.TorchDataset"
    # mypkg.make_dataset, say: a Dataset class, a function returning Dataset(s), or a Dataset
    # (an import path like a _target_, so a checkpoint's is followed only when trusted)
    source: Optional[str] = field(default=None, metadata={"import_path": True})
    kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for data.source
    task: Optional[str] = None  # classification | regression | language_modeling; null: from a sample
    num_classes: Optional[int] = None  # null: the Dataset's `classes`, else max label + 1
    vocab_size: Optional[int] = None  # language modelling; null: max token id + 1


@dataclass
class ImageFolderConfig(DatasetSplitsConfig):
    _target_: str = "bigmodel_cli.data.image_folder.ImageFolder"
    path: Optional[str] = None  # a folder with one subfolder of images per class
    val_path: Optional[str] = None  # the same layout; null: data.val_fraction of data.path
    test_path: Optional[str] = None  # the same layout; null: data.test_fraction of data.path, else val
    image_size: int = 32  # every image is resized to image_size x image_size
    channels: int = 3  # 3: RGB, 1: grey
    normalize: str = "imagenet"  # imagenet | folder (its own mean and std) | none
    num_workers: int = 2  # processes that decode images while the model trains


# ------------------------------------------------------------------------- trainer


@dataclass
class EarlyStoppingConfig:
    # Validations in a row without improvement of trainer.monitor that end the run (null: off).
    patience: Optional[int] = None
    min_delta: float = 0.0  # how much better than its best the monitor must get to count as improving


#: trainer.parallel.schedule's values: how a pipeline orders its micro-batches
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass
class ParallelConfig:
    # Ranks that split each layer's matrices (tensor parallelism; gpt, transformer, mlp).
    tp: int = 1
    # Pipeline stages the repeated blocks are cut into (embeddings first, head and loss last).
    pp: int = 1
    # Micro-batches each pipeline step splits its batch into (null: 2 x trainer.parallel.pp).
    microbatches: Optional[int] = None
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b | interleaved_1f1b
    # Norms and residual stream on sequence shards under tp>1; null: where exact (CUDA or no dropout).
    sequence_parallel: Optional[bool] = None


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.fp32
    # fp32 matrix products on TF32 tensor cores (CUDA, Ampere and later): much faster, about
    # 1e-3 relative error per product. false: full fp32.
    tf32: bool = True
    # Training stops at whichever limit comes first; null disables a limit.
    max_steps: Optional[int] = 2000
    max_epochs: Optional[int] = None  # epoch limit (null: none)
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the effective batch is batch x devices x this)
    grad_clip: Optional[float] = 1.0  # clip the gradient norm to this (null: off)
    log_every: int = 50  # optimizer steps between log lines and metric records
    val_every: int = 250  # optimizer steps between validations (each also writes a checkpoint)
    val_at_start: bool = True  # validate once before the first step
    # Cap on batches per evaluation and data-parallel replica (null: the whole split); R replicas
    # evaluate the split's first R x eval_batches batches.
    eval_batches: Optional[int] = None
    seed: int = 42  # seeds Python, NumPy and torch on every rank (0..2^32-1)
    deterministic: bool = False  # deterministic kernels only (slower; errors where none exists)
    monitor: str = "val/loss"  # the validation metric that picks the best checkpoint, e.g. val/accuracy
    monitor_mode: MonitorMode = MonitorMode.auto  # whether a lower (min) or higher (max) monitor is better
    # Checkpoints are written at every validation, and also every `checkpoint_every` steps
    # and/or `checkpoint_every_min` minutes, and when a stop signal arrives.
    save_checkpoints: bool = True
    checkpoint_every: Optional[int] = None  # also write a checkpoint every this many steps (null: only at validations)
    checkpoint_every_min: Optional[float] = None  # also write a checkpoint every this many minutes (null: off)
    keep_last: int = 2  # newest step checkpoints kept (the best one is always kept too)
    # auto: continue from the newest valid checkpoint in the run dir, if there is one;
    # none: never; or a checkpoint file / run dir to continue from.
    resume: str = "auto"
    # Start from another run's weights only (fresh optimizer and step), for fine-tuning.
    init_from: Optional[str] = None
    on_nonfinite: NonFinite = NonFinite.stop  # what a NaN/inf loss or gradient does
    # Run after the checkpoint that SIGUSR1 triggers inside a Slurm job; null: do not requeue.
    requeue_command: Optional[str] = "scontrol requeue {job_id}"
    progress: ProgressMode = ProgressMode.auto  # how the console shows progress
    # Processes per node (one per GPU; on CPU, gloo processes). >1 launches workers itself,
    # unless torchrun/srun already started this process as one rank of many.
    devices: int = 1
    num_nodes: int = 1  # machines in the job (with our launcher: MASTER_ADDR/MASTER_PORT on each)
    strategy: Strategy = Strategy.ddp  # how ranks share the model
    backend: Backend = Backend.auto  # the collective communication library
    # A collective that waits longer than this ends the job instead of hanging it.
    dist_timeout_s: float = 300.0
    # torch.compile the model (checkpoints still hold the plain model's weights).
    compile: bool = False
    # CPU threads per rank: auto splits the CPUs this process may use and finds idle among its
    # local ranks; or N.
    threads: str = "auto"
    # End the run once the monitor stalls: early_stopping.patience=5 (early_stopping.min_delta).
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Model parallelism over the ranks: parallel.tp=T and parallel.pp=P; data parallelism
    # (trainer.strategy) fills the rest of the world, dp = ranks / (T x P).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Print the plan (memory per rank, steps, FLOPs, launch command) as `bigmodel plan` does,
    # and exit without training or making a run dir.
    dry_run: bool = False


# -------------------------------------------------------------------- distillation


@dataclass
class DistillConfig:
    # A trained checkpoint (run dir or file) of the same data whose softened outputs the
    # model learns from as well (engine/distill.py); null: no distillation.
    teacher: Optional[str] = None
    temperature: float = 4.0  # both models' logits are divided by this before the softmax
    alpha: float = 0.5  # weight of the distillation term; the task loss gets 1 - alpha
    # Import paths outside bigmodel that the teacher checkpoint's stored config may name.
    trusted_targets: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------- loggers
# Several at once: logger=[jsonl,csv,tensorboard]. Each lands under logger.<name>.


@dataclass
class JsonlLoggerConfig:
    _target_: str = "bigmodel_cli.telemetry.sinks.JsonlSink"  # writes metrics.jsonl (read by report, plot)


@dataclass
class CsvLoggerConfig:
    _target_: str = "bigmodel_cli.telemetry.sinks.CsvSink"  # writes metrics.csv


@dataclass
class TensorBoardLoggerConfig:
    _target_: str = "bigmodel_cli.telemetry.sinks.TensorBoardSink"
    subdir: str = "tensorboard"  # inside the run dir; `tensorboard --logdir outputs` finds every run


@dataclass
class WandbLoggerConfig:
    _target_: str = "bigmodel_cli.telemetry.sinks.WandbSink"
    project: str = "bigmodel"  # the W&B project the runs are filed under
    mode: str = "offline"  # offline | online | disabled; offline runs sync later with `wandb sync`


# ------------------------------------------------------------------------ tokenizer
# (The commands' own top-level schemas live in their modules, bigmodel_cli/commands/.)


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char | byte | bpe | gpt2 | hf
    vocab_size: Optional[int] = None  # bpe only (default 4096)
    # gpt2: a local GPT-2 ranks file (gpt2.tiktoken; null: tiktoken's cache); hf: a tokenizer.json
    path: Optional[str] = None


# ------------------------------------------------------------------ lr-find group


@dataclass
class LrFindConfig:
    min_lr: float = 1e-7  # the learning rate of the range test's first step
    max_lr: float = 10.0  # the learning rate of its last step (it stops earlier once the loss diverges)
    num_steps: int = 100  # optimizer steps from min_lr to max_lr, spaced geometrically (2 to 10,000)
    # Weight of the past in the loss's moving average, from which the suggestion is read (0:
    # none). 0.9 averages about the last 10 steps; Lightning's 0.98 about 50, half of a 100-step
    # test, so its curve trails the raw loss.
    smoothing: float = 0.9
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this multiple of its lowest value


SCHEMAS = {
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "rnn": RNNConfig,
              "transformer": TransformerConfig, "gpt": GPTConfig,
              "hf_causal_lm": HFCausalLMConfig, "hf_classifier": HFClassifierConfig},
    "optim": {"sgd": SGDConfig, "momentum": MomentumConfig, "adam": AdamConfig,
              "adamw": AdamWConfig, "adagrad": AdagradConfig, "rmsprop": RMSpropConfig},
    "scheduler": {"constant": ConstantScheduleConfig, "step": StepScheduleConfig,
                  "exponential": ExponentialScheduleConfig, "cosine": CosineScheduleConfig,
                  "torch_cosine": TorchCosineScheduleConfig},
    "data": {"digits": DigitsConfig, "synthetic": SyntheticConfig, "sine": SineConfig,
             "text": TextConfig, "tokens": TokensConfig, "hf": HFDataConfig, "dataset": DatasetConfig,
             "image_folder": ImageFolderConfig},
    "tokenizer": {"char": TokenizerConfig, "byte": TokenizerConfig, "bpe": TokenizerConfig,
                  "gpt2": TokenizerConfig, "hf": TokenizerConfig},
    "trainer": {"default": TrainerConfig},
    "logger": {"jsonl": JsonlLoggerConfig, "csv": CsvLoggerConfig, "tensorboard": TensorBoardLoggerConfig,
               "wandb": WandbLoggerConfig},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    cs.store(group="schema/lr_find", name="default", node=LrFindConfig)
    cs.store(group="schema/distill", name="default", node=DistillConfig)
    from bigmodel_cli.sweepers import register_optuna_defaults

    register_optuna_defaults()


def register_command_schema(command: str, schema: type) -> None:
    """A command's own top-level schema, as conf/<config name>.yaml names it
    (`defaults: [<config name>_schema, ...]`); called by the command's module."""
    register_configs()
    ConfigStore.instance().store(name=f"{config_name(command)}_schema", node=schema)


def trainer_settings(cfg: DictConfig) -> "TrainerConfig":
    """cfg.trainer as a typed TrainerConfig (enums as enums), what the engine receives."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), cfg.trainer))


def plain_config(cfg: DictConfig) -> DictConfig:
    """The config with enums as plain strings (what models and the engine expect), still
    refusing unknown keys."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(plain, True)
    return plain
