"""The optimizer against hand-computed numpy: the warmup-cosine learning rate, global-norm
clipping before AdamW, and weight decay on weight matrices only (not on norm scales)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.train_config import OptimizerConfig, TrainConfig
from l4jax.train_step import lr_schedule, make_optimizer

TC = TrainConfig(
    steps=10,
    optimizer=OptimizerConfig(
        warmup_steps=3, learning_rate=1e-2, min_lr_ratio=0.1, clip_norm=1.0, weight_decay=0.1
    ),
)
OPT = TC.optimizer


def hand_lr(step: int, tc: TrainConfig = TC) -> float:
    """Linear warmup from 0 over `warmup_steps`, then cosine to learning_rate * min_lr_ratio at
    `steps` (and flat after)."""
    opt = tc.optimizer
    peak, end, warmup = opt.learning_rate, opt.learning_rate * opt.min_lr_ratio, opt.warmup_steps
    if step < warmup:
        return peak * step / warmup
    frac = min((step - warmup) / (tc.steps - warmup), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def test_learning_rate_schedule():
    schedule = lr_schedule(TC)
    for step in range(14):
        np.testing.assert_allclose(float(schedule(step)), hand_lr(step), rtol=1e-6, atol=1e-9)


def adamw_by_hand(p, m, v, t, lr, decay):
    """One AdamW step with bias correction; decoupled decay only where `decay`."""
    adam = (m / (1 - OPT.b1**t)) / (np.sqrt(v / (1 - OPT.b2**t)) + OPT.eps)
    return p - lr * (adam + (OPT.weight_decay * p if decay else 0.0))


def test_clipping_adamw_and_the_decay_mask():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3))
    scale = 1 + 0.1 * rng.standard_normal(3)
    optimizer = make_optimizer(TC)
    got = {"embed_tokens": jnp.asarray(weight, jnp.float32)}
    got["norm"] = {"scale": jnp.asarray(scale, jnp.float32)}
    state = optimizer.init(got)
    want = {"w": weight, "s": scale}  # float64, by hand
    mu = {k: np.zeros_like(v) for k, v in want.items()}
    nu = {k: np.zeros_like(v) for k, v in want.items()}
    for t, size in enumerate((5.0, 0.1, 3.0, 0.5), start=1):  # global norms above/below 1
        g = {"w": size * rng.standard_normal((4, 3)), "s": size * rng.standard_normal(3)}
        grads = {"embed_tokens": jnp.asarray(g["w"], jnp.float32)}
        grads["norm"] = {"scale": jnp.asarray(g["s"], jnp.float32)}
        updates, state = optimizer.update(grads, state, got)
        got = jax.tree.map(lambda p, u: p + u, got, updates)
        # by hand: clip the global norm first, then AdamW at the learning rate of step t - 1
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        for k in want:
            x = g[k] * min(1.0, OPT.clip_norm / norm)
            mu[k] = OPT.b1 * mu[k] + (1 - OPT.b1) * x
            nu[k] = OPT.b2 * nu[k] + (1 - OPT.b2) * x * x
            want[k] = adamw_by_hand(want[k], mu[k], nu[k], t, hand_lr(t - 1), decay=k == "w")
        np.testing.assert_allclose(np.asarray(got["embed_tokens"]), want["w"], rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(
            np.asarray(got["norm"]["scale"]), want["s"], rtol=2e-5, atol=1e-7
        )
