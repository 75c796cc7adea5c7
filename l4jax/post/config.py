"""The post-training settings of `l4jax train --task sft|dpo|grpo` (TrainConfig.post)."""

from __future__ import annotations

import dataclasses
import math

from l4jax.errors import ConfigError

DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.04}  # TRL's DPO default; DeepSeekMath's GRPO KL weight


@dataclasses.dataclass(frozen=True)
class PostConfig:
    init_from: str | None = None  # HF, Meta or l4jax checkpoint directory (or a training run)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention",)
    beta: float | None = None  # dpo: the DPO beta; grpo: KL weight (None: DEFAULT_BETA)
    label_smoothing: float = 0.0  # dpo: conservative DPO (probability the labels are flipped)
    reward: str | None = None  # grpo: module:function or path.py:function (None: built-in)
    num_generations: int = 8  # grpo: completions per prompt
    max_new_tokens: int = 16  # grpo: completion length
    epsilon: float = 0.2  # grpo: ratio clipped to [1 - epsilon, 1 + epsilon]
    iterations: int = 1  # grpo: optimizer steps per rollout batch (the clip matters when > 1)
    routing_replay: bool = False  # grpo: learner uses the rollout's MoE experts
    dynamic_filtering: bool = True  # grpo: drop groups whose rewards are all equal

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank: must be >= 0, got {self.lora_rank}")
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
