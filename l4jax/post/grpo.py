"""GRPO rollouts: sample completions, score them, turn them into a learner batch.

Per step (`Rollouts.__call__`, the train loop's `Task.prepare`): the prompts of the step are
rendered as chats with an open assistant header; `l4jax.generate` samples
`--num-generations` completions per prompt from the current policy (LoRA: base and adapters
merged) at `--temperature`; the reward function scores the decoded completions; advantages are
normalised per group, (r - mean) / (std + 1e-4) with the unbiased std (as TRL); groups whose
rewards are all equal have zero advantage everywhere and, with dynamic filtering, are dropped
from the loss (their tokens get weight 0; `filtered_fraction` is logged). Then one
teacher-forced forward pass of the rollout params gives the old log-probs (and, with routing
replay, the experts each MoE layer chose), the learner's reference point for the clipped ratio.

`load_reward("module:function" | "path/to/file.py:function" | built-in name)`: a reward is
`fn(prompts, completions, **row_fields) -> list[float]` (TRL's convention): `prompts` are the
rows' `prompt` fields, one per completion, and each extra row field is passed as a list.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.model import Llama4ForCausalLM
from l4jax.post.demo import REWARDS
from l4jax.post.lora import merge
from l4jax.post.objectives import Policy, logps_from_logits
from l4jax.train_config import PostConfig
from pipelines.chat import fit_pair, padded_row, prompt_messages, render_chat
from pipelines.loader import to_global_array
from sharding.rules import batch_sharding, mesh_context

Reward = Callable[..., list[float]]


def load_reward(spec: str | None) -> Reward:
    """A reward function by name: built-in (`reverse`, `exact`), `module:function` (importable
    from the working directory) or `path/to/file.py:function`."""
    if spec is None:
        return REWARDS["reverse"]
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ConfigError(
            f"--reward {spec}: not MODULE:FUNCTION, FILE.py:FUNCTION or {list(REWARDS)}"
        )
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ConfigError(f"--reward {spec}: no file {where}")
            loader = importlib.util.spec_from_file_location(
                f"l4jax_reward_{abs(hash(where))}", where
            )
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"--reward {spec}: cannot import {where} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec}: {where} has no function {name!r}")
    return fn


def group_advantages(rewards_pg: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """(r - group mean) / (group std + eps), std unbiased (ddof 1) as TRL; [P, G] -> [P, G]."""
    mean = rewards_pg.mean(axis=1, keepdims=True)
    std = rewards_pg.std(axis=1, ddof=1, keepdims=True)
    return (rewards_pg - mean) / (std + eps)


def completion_of(ids: np.ndarray, stop_ids: set[int]) -> list[int]:
    """New ids up to and including the first stop id."""
    out = []
    for t in ids.tolist():
        out.append(t)
        if t in stop_ids:
            break
    return out


class Rollouts:
    """`Task.prepare` of GRPO: (state, prompt rows of the step) -> (learner batch, metrics)."""

    def __init__(
        self,
        config: Llama4Config,
        tc: Any,
        post: PostConfig,
        policy: Policy,
        tokenizer: Any,
        mesh: Mesh,
        frozen: Any,
    ):
        self.config, self.tc, self.post, self.policy = config, tc, post, policy
        self.tokenizer, self.mesh, self.frozen = tokenizer, mesh, frozen
        self.reward = load_reward(post.reward)
        self.sharding = batch_sharding(mesh, tc.strategy)
        self.stop_ids = [i for i in tokenizer.stop_tokens if i < config.vocab_size]
        self.cached: tuple[Any, dict[str, float]] | None = None
        self._old = jax.jit(self._old_logps)

    def _old_logps(self, trainable, frozen, rows):
        """Teacher-forced log-probs (and routing) of the completions under the rollout
        params."""
        variables = self.policy.variables(trainable, frozen)
        model = Llama4ForCausalLM(self.config)
        logits, state = model.apply(
            variables, rows["tokens"], rows["positions"], rows["segment_ids"],
            mutable=["expert_choices"],
        )  # fmt: skip
        logp, _ = logps_from_logits(logits, rows, temperature=self.tc.sample.temperature)
        ids = _expert_ids(state.get("expert_choices", {}), rows["tokens"].shape)
        return logp, ids

    def model_params(self, trainable: Any) -> Any:
        if self.policy.lora is None:
            return trainable
        return merge(self.frozen["base"], trainable, self.policy.lora)

    def __call__(self, state: Any, prompt_rows: list[dict[str, Any]]):
        from l4jax.decoding import generate

        step = int(state.step)
        if self.cached is not None and step % self.post.iterations:
            return self.cached  # --iterations > 1: the same rollouts, another learner step
        g, tc = self.post.num_generations, self.tc
        start = time.perf_counter()
        prompts = [
            render_chat(self.tokenizer, prompt_messages(r["prompt"], "row"), open_assistant=True)[0]
            for r in prompt_rows
        ]
        prompts = [p[-(tc.seq_len - self.post.max_new_tokens) :] for p in prompts]
        repeated = [p for p in prompts for _ in range(g)]
        with mesh_context(self.mesh, tc.strategy):
            ids = generate(
                Llama4ForCausalLM(self.config), self.model_params(state.params), repeated,
                self.post.max_new_tokens, temperature=tc.sample.temperature,
                seed=tc.seed * 1_000_003 + step, stop_ids=self.stop_ids,
                pad_id=self.tokenizer.pad_id,
            )  # fmt: skip
        width = ids.shape[1] - self.post.max_new_tokens
        completions = [completion_of(row[width:], set(self.stop_ids)) for row in ids]
        stops = set(self.stop_ids)
        texts = [self.tokenizer.decode([t for t in c if t not in stops]) for c in completions]
        rollout_seconds = time.perf_counter() - start
        fields = {
            k: [r[k] for r in prompt_rows for _ in range(g)]
            for k in prompt_rows[0]
            if k != "prompt"
        }
        rewards = np.asarray(
            self.reward([r["prompt"] for r in prompt_rows for _ in range(g)], texts, **fields),
            np.float64,
        )
        if rewards.shape != (len(texts),) or not np.all(np.isfinite(rewards)):
            raise ConfigError(f"--reward: must return {len(texts)} finite floats")
        rewards_pg = rewards.reshape(-1, g)
        adv_pg = group_advantages(rewards_pg)
        keep_p = (
            rewards_pg.std(axis=1) > 0
            if self.post.dynamic_filtering
            else np.ones(len(adv_pg), bool)
        )
        rows = []
        for i, (prompt, completion) in enumerate(zip(repeated, completions, strict=True)):
            full, n_prompt = fit_pair(prompt, completion, tc.seq_len)
            row = padded_row(full, n_prompt, tc.seq_len, self.tokenizer.pad_id)
            if not keep_p[i // g]:
                row["loss_mask"][:] = 0
            row["advantages"] = np.full(tc.seq_len, adv_pg.reshape(-1)[i], np.float32)
            rows.append(row)
        host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch = to_global_array(host, self.sharding)
        with mesh_context(self.mesh, tc.strategy):
            old, expert_ids = self._old(state.params, self.frozen, batch)
        batch["old_logps"] = old
        if self.post.routing_replay:
            batch["expert_ids"] = expert_ids
        metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards_pg.std(axis=1).mean()),
            "filtered_fraction": float(1 - keep_p.mean()),
            "completion_tokens": float(np.mean([len(c) for c in completions])),
            "rollout_seconds": rollout_seconds,
            "rollout_total_seconds": time.perf_counter() - start,
        }
        self.cached = (batch, metrics)
        return batch, metrics


def _expert_ids(expert_choices: Any, shape_bt: tuple[int, int]) -> jax.Array:
    """[B, T, MoE layers, k] experts chosen per token, MoE layers in depth order, from the
    `expert_ids` sown into the `expert_choices` collection ([groups, B*T, k] per scan slot)."""
    layers = expert_choices.get("layers", {})
    slots = sorted((k for k in layers if k.startswith("layer_")), key=lambda s: int(s[6:]))
    per_slot = []
    for slot in slots:
        ff = layers[slot].get("feed_forward", {})
        if "expert_ids" in ff:
            per_slot.append(ff["expert_ids"][0])  # [G, B*T, k]
    if not per_slot:
        return jnp.zeros((*shape_bt, 0, 1), jnp.int32)
    stacked = jnp.stack(per_slot, axis=2)  # [G, B*T, slots, k]
    g, bt, s, k = stacked.shape
    # depth order: group-major, slot-minor
    return stacked.transpose(1, 0, 2, 3).reshape(*shape_bt, g * s, k)
