"""`TrainConfig`: everything about a training run except the model, and its command-line flags.

    TrainConfig(steps, batch_size, seq_len, grad_accum, seed, mesh, strategy, task,
                optimizer=OptimizerConfig(...), data=DataSource(...),
                checkpoint=CheckpointConfig(...), logging=LoggingConfig(...),
                sample=SampleConfig(...), post=PostConfig(...))

Every field that `l4jax train` exposes names its flag (group, help) in its metadata (`flag`);
`add_config_arguments` adds those flags to a parser and `config_from_args` builds the config
back from the parsed arguments, so a new setting is one line here, not three in the CLI.
This module sits below both the training loop and `l4jax.post` (which read it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any

from l4jax.errors import ConfigError
from l4jax.quantization import MODES as QUANTIZE_MODES
from sharding.rules import STRATEGIES

TASKS = ("pretrain", "sft", "dpo", "grpo")
DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.04}  # TRL's DPO default; DeepSeekMath's GRPO KL weight

# argparse groups of `l4jax train --help`, in order ("model" is the CLI's own)
DATA, OPT, PAR, OUT = "data", "optimisation", "parallelism", "checkpoints and metrics"
POST = "post-training (docs/post_training.md)"
GROUPS = ("model", DATA, OPT, PAR, OUT, POST)


def flag(default: Any, *, group: str, name: str | None = None, **argparse_kw: Any) -> Any:
    """A field with a command-line flag `--field-name` (or `name`) in argparse group `group`;
    other keywords (help, action, choices, type) go to `add_argument`."""
    return dataclasses.field(
        default=default, metadata={"flag": name, "group": group, "argparse": argparse_kw}
    )


def _sub(cls: type) -> Any:
    """A nested config (its own fields carry their flags)."""
    return dataclasses.field(default_factory=cls)


def _names(text: str) -> tuple[str, ...]:
    """A comma list flag -> a tuple of names."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping on a warmup-cosine schedule; optional router losses."""

    learning_rate: float = flag(3e-3, group=OPT, name="--lr", help="peak learning rate")
    warmup_steps: int = flag(15, group=OPT)
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = flag(0.1, group=OPT)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = flag(1.0, group=OPT)
    # coefficients; 0 = off (the references use none)
    router_z_loss: float = flag(0.0, group=OPT, help="coefficient (0: off)")
    load_balance_loss: float = flag(0.0, group=OPT, help="coefficient (0: off)")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where the training text comes from and how it is tokenized (pipelines/)."""

    path: str | None = flag(
        None, group=DATA, name="--data",
        help="text file, directory, JSONL, Parquet or ArrayRecord (default: the built-in "
        "corpus, the Python standard library's source)",
    )  # fmt: skip
    field: str = flag("text", group=DATA, name="--data-field", help="JSONL/Parquet text field")
    tokenizer: str | None = flag(
        None, group=DATA, help="tokenizer.model / tokenizer.json (default: by vocab)"
    )
    workers: int = flag(0, group=DATA, name="--data-workers")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the run (`l4jax.checkpoint`); `directory` None: none."""

    directory: str | None = flag(
        None, group=OUT, name="--checkpoint-dir", help="default: runs/<preset>; resumes from it"
    )
    save_every: int = flag(50, group=OUT)
    keep: int = flag(3, group=OUT, help="checkpoints to keep")
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics: a log line every `log_every` steps, JSONL, TensorBoard, a progress bar."""

    log_every: int = flag(10, group=OUT)
    metrics_jsonl: str | None = flag(
        None, group=OUT, help="default: <checkpoint-dir>/metrics.jsonl"
    )
    # default: <checkpoint directory>/tensorboard
    tensorboard_dir: str | None = flag(
        None, group=OUT, help="default: <checkpoint-dir>/tensorboard"
    )
    progress: bool = flag(
        True, group=OUT, name="--no-progress", action="store_false", help="no progress bar"
    )


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The text sampled from the model at the end of a run."""

    tokens: int = flag(200, group=OUT, name="--sample-tokens", help="0: no sample")
    prompt: str = flag("def ", group=OUT, name="--prompt", help="prompt of the final sample")
    temperature: float = flag(  # also the GRPO rollout temperature
        0.7, group=OUT, name="--temperature", help="of the final sample, and of GRPO rollouts"
    )


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """The post-training settings of `l4jax train --task sft|dpo|grpo` (`l4jax.post`)."""

    # HF, Meta or l4jax checkpoint directory (or a training run)
    init_from: str | None = flag(
        None, group=POST, help="start from this checkpoint (HF, Meta, l4jax, a run)"
    )
    lora_rank: int = flag(0, group=POST, help="LoRA rank (0: full fine-tuning)")
    lora_alpha: float = flag(16.0, group=POST, help="LoRA scale alpha / rank")
    lora_targets: tuple[str, ...] = flag(
        ("attention",), group=POST, type=_names,
        help="comma list: q_proj,k_proj,v_proj,o_proj,attention,shared_expert,experts,mlp",
    )  # fmt: skip
    quantize: str | None = flag(  # QLoRA: the frozen base quantized (l4jax.quantization)
        None, group=POST, choices=QUANTIZE_MODES,
        help="QLoRA: quantize the frozen base (needs --lora-rank)",
    )  # fmt: skip
    # dpo: the DPO beta; grpo: KL weight (None: DEFAULT_BETA)
    beta: float | None = flag(None, group=POST, help="dpo: beta (0.1); grpo: KL weight (0.04)")
    # dpo: conservative DPO (probability the labels are flipped)
    label_smoothing: float = flag(0.0, group=POST, help="dpo: cDPO smoothing")
    # grpo: module:function or path.py:function (None: built-in)
    reward: str | None = flag(
        None, group=POST, help="grpo: MODULE:FUNCTION, FILE.py:FUNCTION or a built-in"
    )
    num_generations: int = flag(8, group=POST, help="grpo: per prompt")
    max_new_tokens: int = flag(16, group=POST, help="grpo: completion length")
    # grpo: ratio clipped to [1 - epsilon, 1 + epsilon]
    epsilon: float = flag(0.2, group=POST, help="grpo: ratio clip")
    # grpo: optimizer steps per rollout batch (the clip matters when > 1)
    iterations: int = flag(1, group=POST, name="--grpo-iterations", help="grpo: steps per rollout")
    routing_replay: bool = flag(  # grpo: learner uses the rollout's MoE experts
        False, group=POST, action="store_true", help="grpo: rollout's experts"
    )
    dynamic_filtering: bool = flag(  # grpo: drop groups whose rewards are all equal
        True, group=POST, name="--no-dynamic-filtering", action="store_false",
        help="grpo: keep groups whose rewards are all equal",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank: must be >= 0, got {self.lora_rank}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_MODES:
                raise ConfigError(f"--quantize: {self.quantize!r} is not one of {QUANTIZE_MODES}")
            if not self.lora_rank:
                raise ConfigError(
                    "--quantize: a quantized base is frozen; train adapters on it (--lora-rank)"
                )
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"--label-smoothing: must lie in [0, 0.5), got {self.label_smoothing}"
            )
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"--beta: must be a finite number >= 0, got {self.beta}")
        for name in ("num_generations", "max_new_tokens", "iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.num_generations < 2:
            raise ConfigError("--num-generations: GRPO needs at least 2 completions per prompt")

    def beta_for(self, task: str) -> float:
        return DEFAULT_BETA.get(task, 0.0) if self.beta is None else self.beta


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model (`Llama4Config`)."""

    steps: int = flag(150, group=OPT)
    # global rows per step (all hosts, all micro-batches)
    batch_size: int = flag(8, group=OPT, help="global rows per step")
    seq_len: int = flag(256, group=OPT)
    grad_accum: int = flag(1, group=OPT, help="micro-batches")  # micro-batches per step
    seed: int = flag(0, group=OPT)
    # empty: every device on fsdp
    mesh: str = flag("", group=PAR, help="axis sizes, e.g. data=2,fsdp=2,expert=2")
    strategy: str = flag("fsdp", group=PAR, choices=sorted(STRATEGIES))
    task: str = flag("pretrain", group=POST, choices=TASKS, help="the training objective")
    optimizer: OptimizerConfig = _sub(OptimizerConfig)
    data: DataSource = _sub(DataSource)
    checkpoint: CheckpointConfig = _sub(CheckpointConfig)
    logging: LoggingConfig = _sub(LoggingConfig)
    sample: SampleConfig = _sub(SampleConfig)
    post: PostConfig = _sub(PostConfig)  # sft/dpo/grpo/LoRA settings

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "grad_accum": self.grad_accum,
            "checkpoint.save_every": self.checkpoint.save_every,
            "logging.log_every": self.logging.log_every,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TrainConfig.{name}: must be a positive int, got {value!r}")
        if self.task not in TASKS:
            raise ConfigError(f"TrainConfig.task: {self.task!r} is not one of {TASKS}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig.batch_size: {self.batch_size} is not divisible by "
                f"grad_accum={self.grad_accum}"
            )


# ---- flags, derived from the fields ------------------------------------------------------------


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, its type) of every field of `cls` that is a flag or a nested config."""
    hints = typing.get_type_hints(cls)
    return [
        (f, hints[f.name])
        for f in dataclasses.fields(cls)
        if "group" in f.metadata or dataclasses.is_dataclass(hints[f.name])
    ]


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    """The argparse attribute of a field's flag (argparse's own rule for the flag name)."""
    return _flag_name(f).lstrip("-").replace("-", "_")


def add_config_arguments(groups: dict[str, Any], cls: type = TrainConfig) -> None:
    """Add the flag of every flagged field of `cls` (nested configs included) to
    `groups[field's group]` (argparse groups), with the field's default and type."""
    for f, hint in _fields(cls):
        if dataclasses.is_dataclass(hint):
            add_config_arguments(groups, hint)
            continue
        kw: dict[str, Any] = {"default": f.default, "dest": _dest(f), **f.metadata["argparse"]}
        if "action" not in kw and "type" not in kw:  # `str | None` -> str
            kw["type"] = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        groups[f.metadata["group"]].add_argument(_flag_name(f), **kw)


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """`cls` with every flagged field (nested configs included) read from parsed `args`."""
    return cls(
        **{
            f.name: config_from_args(args, hint)
            if dataclasses.is_dataclass(hint)
            else getattr(args, _dest(f))
            for f, hint in _fields(cls)
        }
    )
