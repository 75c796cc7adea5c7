"""Post-training: `l4jax train --task sft|dpo|grpo`, LoRA, `l4jax merge-lora`.

See docs/post_training.md.

- `pipelines.chat`: Llama 4 chat rendering with the loss mask, JSONL rows, batches;
- `l4jax.post.objectives`: SFT, DPO and GRPO losses over a policy (full params or LoRA);
- `l4jax.post.lora`: adapters, their shardings, merging;
- `l4jax.post.grpo`: rollouts with `l4jax.generate`, rewards, group advantages, routing replay;
- `l4jax.post.init_from`: the `--init-from` checkpoint (its config and params);
- `l4jax.post.tasks`: the `l4jax.train_task.Task` of each objective (what the training loop runs);
- `l4jax.post.demo`: built-in demo data and rewards (no downloads).
"""

from l4jax.post.tasks import make_task
from l4jax.train_config import PostConfig  # the settings, below both post and the train loop

__all__ = ["PostConfig", "make_task"]
