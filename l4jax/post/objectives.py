"""Post-training objectives (`l4jax.train_task.Objective`): SFT, DPO and GRPO losses.

All three read per-token log-probabilities of target tokens under a *policy* (the trained
params, or a frozen base plus LoRA adapters) and, for DPO/GRPO, under a frozen *reference*
(the initial params, or the LoRA base: adapters off), computed in the same step under
`stop_gradient`. Log-probs and losses are fp32 (the logits are fp32).

- SFT: mean cross-entropy over the tokens the chat mask marks (`pipelines.chat`).
- DPO (Rafailov et al. 2023; TRL's `sigmoid` loss with label smoothing, cDPO):
  h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)) over completion tokens,
  loss = -(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h), log 2 when pi == ref.
- GRPO (Shao et al. 2024, with DAPO's token-level mean): per completion token,
  -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL, r = exp(log pi - log pi_old), KL the k3
  estimate exp(q) - q - 1 with q = log ref - log pi (as TRL), averaged over every completion
  token of the batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from l4jax.config import Llama4Config
from l4jax.model import Llama4ForCausalLM
from l4jax.post.lora import LoraConfig, apply_variables
from l4jax.train_task import Objective
from pipelines.chat import target_weights
from pipelines.packing import next_token_targets

Batch = dict[str, jax.Array]


class Policy(NamedTuple):
    """How objectives call the model: full params, or a frozen base with LoRA adapters."""

    config: Llama4Config
    lora: LoraConfig | None = None

    def variables(self, trainable: Any, frozen: Any) -> dict[str, Any]:
        if self.lora is None:
            return {"params": trainable}
        return apply_variables(frozen["base"], trainable, self.lora)

    def reference(self, frozen: Any) -> dict[str, Any]:
        """The frozen reference model: the LoRA base, or the stored initial params."""
        return {"params": frozen["base"] if self.lora is not None else frozen["reference"]}


def token_logps(
    config: Llama4Config,
    variables: dict[str, Any],
    rows: Batch,
    prefix: str = "",
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(log p [B, T], weights [B, T]): log-prob at position t of token t + 1, and the weight of
    that prediction (same segment, target token marked by `loss_mask`). `rows` holds
    `{prefix}tokens`, `segment_ids`, `positions`, `loss_mask` [B, T] (and, for routing replay,
    `expert_ids` [B, T, MoE layers, k])."""
    tokens, segments = rows[prefix + "tokens"], rows[prefix + "segment_ids"]
    if prefix + "expert_ids" in rows:
        variables = {**variables, "routing": replay_routing(config, rows[prefix + "expert_ids"])}
    logits_btv = Llama4ForCausalLM(config).apply(
        variables, tokens, rows[prefix + "positions"], segments
    )
    return logps_from_logits(logits_btv, rows, prefix, temperature)


def logps_from_logits(
    logits_btv: jax.Array, rows: Batch, prefix: str = "", temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """`token_logps` from the logits [B, T, V] (fp32); unweighted positions give 0."""
    tokens, segments = rows[prefix + "tokens"], rows[prefix + "segment_ids"]
    if temperature != 1.0:
        logits_btv = logits_btv / temperature
    targets_bt, weights_bt = next_token_targets(tokens, segments)
    weights_bt = target_weights(rows[prefix + "loss_mask"], weights_bt)
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.where(weights_bt > 0, target_bt - logz_bt, 0.0), weights_bt


def replay_routing(config: Llama4Config, expert_ids_btlk: jax.Array) -> dict[str, Any]:
    """The `routing` collection that makes each MoE layer use the given experts
    ([B, T, MoE layers, k], MoE layers in depth order) instead of its router's top-k."""
    b, t = expert_ids_btlk.shape[:2]
    period, groups = config.scan_period, config.num_hidden_layers // config.scan_period
    moe_slots = [s for s in range(period) if config.layer_kinds[s].is_moe]
    ids = expert_ids_btlk.reshape(b * t, groups, len(moe_slots), -1)
    return {
        "layers": {
            f"layer_{slot}": {"feed_forward": {"expert_ids": jnp.moveaxis(ids[:, :, j], 1, 0)}}
            for j, slot in enumerate(moe_slots)
        }
    }


# ---- SFT ---------------------------------------------------------------------------------


def _masked_tokens(batch: Batch, prefix: str = "") -> jax.Array:
    _, weights = next_token_targets(batch[prefix + "tokens"], batch[prefix + "segment_ids"])
    return jnp.sum(target_weights(batch[prefix + "loss_mask"], weights))


def sft_objective(policy: Policy) -> Objective:
    def loss(params, frozen, mb, total):
        logp_bt, weights_bt = token_logps(policy.config, policy.variables(params, frozen), mb)
        value = -jnp.sum(logp_bt * weights_bt) / total
        return value, {"loss": value}

    return Objective(loss, lambda batch: jnp.maximum(_masked_tokens(batch), 1.0))


# ---- DPO ---------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-pair losses, chosen rewards, rejected rewards) from sequence log-probs [P]."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -jax.nn.log_sigmoid(beta * h) * (1 - label_smoothing)
    losses -= jax.nn.log_sigmoid(-beta * h) * label_smoothing
    return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def sequence_logps(config, variables, batch, prefix) -> jax.Array:
    logp_bt, weights_bt = token_logps(config, variables, batch, prefix)
    return jnp.sum(logp_bt * weights_bt, axis=-1)


def dpo_objective(policy: Policy, beta: float, label_smoothing: float) -> Objective:
    def loss(params, frozen, mb, pairs):
        variables, reference = policy.variables(params, frozen), policy.reference(frozen)
        pi = {
            k: sequence_logps(policy.config, variables, mb, f"{k}_") for k in ("chosen", "rejected")
        }
        ref = {
            k: jax.lax.stop_gradient(sequence_logps(policy.config, reference, mb, f"{k}_"))
            for k in ("chosen", "rejected")
        }
        losses, chosen_r, rejected_r = dpo_loss(
            pi["chosen"], pi["rejected"], ref["chosen"], ref["rejected"], beta, label_smoothing
        )
        value = jnp.sum(losses) / pairs
        return value, {
            "loss": value,
            "reward_accuracy": jnp.sum(chosen_r > rejected_r) / pairs,
            "reward_margin": jnp.sum(chosen_r - rejected_r) / pairs,
            "reward_chosen": jnp.sum(chosen_r) / pairs,
            "reward_rejected": jnp.sum(rejected_r) / pairs,
        }

    return Objective(loss, lambda batch: jnp.float32(batch["chosen_tokens"].shape[0]))


# ---- GRPO --------------------------------------------------------------------------------


def grpo_token_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    epsilon: float,
    beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token loss, per-token KL, clipped?) of the clipped GRPO surrogate (shapes alike)."""
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = jnp.zeros_like(logp)
    if ref_logp is not None:
        q = ref_logp - logp
        kl = jnp.exp(q) - q - 1
        loss = loss + beta * kl
    return loss, kl, (ratio * advantages > clipped * advantages)


def grpo_objective(policy: Policy, epsilon: float, beta: float, temperature: float) -> Objective:
    def loss(params, frozen, mb, total):
        logp, weights = token_logps(
            policy.config, policy.variables(params, frozen), mb, temperature=temperature
        )
        ref = None
        if beta > 0:
            ref_logp, _ = token_logps(
                policy.config, policy.reference(frozen), mb, temperature=temperature
            )
            ref = jax.lax.stop_gradient(ref_logp)
        per_token, kl, clipped = grpo_token_loss(
            logp, mb["old_logps"], ref, mb["advantages"], epsilon, beta
        )
        value = jnp.sum(per_token * weights) / total
        return value, {
            "loss": value,
            "kl": jnp.sum(kl * weights) / total,
            "clip_fraction": jnp.sum(clipped * weights) / total,
            "logp_gap": jnp.sum(jnp.abs(logp - mb["old_logps"]) * weights) / total,
        }

    return Objective(loss, lambda batch: jnp.maximum(_masked_tokens(batch), 1.0))
