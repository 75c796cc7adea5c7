"""Training metrics: FLOPs per token and MFU, the per-step record, its log line, and the writer
of JSONL and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from l4jax.config import Llama4Config
from l4jax.train_config import TrainConfig

# ---- FLOPs and MFU -------------------------------------------------------------------------

# dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor data sheets)
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
# CPU: a nominal 32 fp32 FLOP/cycle/core (two AVX2 FMA units) at 3 GHz, shared by the host's
# CPU devices; not a measured peak, so CPU MFU is only a relative number
CPU_NOMINAL_FLOPS_PER_CORE = 32 * 3e9


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, bool]:
    """(peak FLOP/s of one device, whether it is only nominal)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops, False
    cores = os.cpu_count() or 1
    return CPU_NOMINAL_FLOPS_PER_CORE * cores / max(len(jax.local_devices()), 1), True


def flops_per_token(config: Llama4Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x the active matmul
    parameters (top-k routed experts + shared expert + router + attention projections +
    dense layers + lm_head; not the embedding gather) plus attention scores and values over
    the keys each query sees (causal, and chunked on chunked layers)."""
    d, v = config.hidden_size, config.vocab_size
    active = config.num_params(active=True) - v * d * (0 if config.tie_word_embeddings else 1)
    active -= d * (2 * config.num_hidden_layers + 1)  # norm scales
    flops = 6.0 * active
    n_h = config.num_attention_heads * config.head_dim
    for chunked in config.chunked_layers:
        span = min(seq_len, config.attention_chunk_size or seq_len) if chunked else seq_len
        mean_keys = (span + 1) / 2  # causal: query i sees i + 1 keys inside its span
        flops += 3 * 2 * 2 * n_h * mean_keys  # (q k^T, p v) x (fwd + 2 bwd)
    return flops


# ---- metrics output --------------------------------------------------------------------------


class MetricsWriter:
    """One record per step to JSONL and TensorBoard (process 0 only), a line every
    `log_every` steps to the log/progress bar."""

    def __init__(self, tc: TrainConfig, resume_step: int):
        self.primary = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if not self.primary:
            return
        if tc.logging.metrics_jsonl:
            path = Path(tc.logging.metrics_jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_jsonl(path, resume_step)
            self.jsonl = open(path, "a")
        directory = tc.checkpoint.directory
        tb_dir = tc.logging.tensorboard_dir or (
            str(Path(directory) / "tensorboard") if directory else None
        )
        if tb_dir:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(tb_dir)

    def write(self, record: dict[str, Any], load_e: np.ndarray | None) -> None:
        if not self.primary:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)
            if load_e is not None and load_e.size:
                self.tb.add_histogram(
                    "router/expert_fraction", load_e, step, bins=min(64, load_e.size)
                )

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _truncate_jsonl(path: Path, resume_step: int) -> None:
    """Drop records of steps after the checkpoint a run resumes from (they are redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= resume_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def step_record(
    step: int, metrics: dict[str, np.ndarray], seconds: float | None, tc: TrainConfig, fpt: float
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The JSON record of one step, and the per-expert load fractions (mean over layers)."""
    record: dict[str, Any] = {
        "step": step,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "lr": float(metrics["lr"]),
    }
    for name, value in metrics.items():  # the objective's own scalars (dpo, grpo, router)
        if name not in record and name != "target_tokens" and np.ndim(value) == 0:
            record[name] = float(value)
    if seconds is not None and seconds > 0:
        tokens_per_s = tc.batch_size * tc.seq_len / seconds
        peak, nominal = device_peak_flops()
        record["step_seconds"] = seconds
        record["tokens_per_s"] = tokens_per_s
        record["mfu"] = fpt * tokens_per_s / (peak * jax.device_count())
        record["mfu_peak_is_nominal"] = nominal
    load_le = np.asarray(metrics["router_load"], np.float64)
    frac_e = None
    if load_le.size:
        frac_le = load_le / np.maximum(load_le.sum(-1, keepdims=True), 1)
        frac_e = frac_le.mean(0)
        record["router_max_load"] = float((frac_le.max(-1) * load_le.shape[-1]).mean())
        record["router_load"] = [round(float(f), 5) for f in frac_e]
    return record, frac_e


def log_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']:>6}", f"loss {record['loss']:.4f}"]
    parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        nominal = " (nominal CPU peak)" if record["mfu_peak_is_nominal"] else ""
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts.append(f"MFU {100 * record['mfu']:.2f}%{nominal}")
    for name in ("reward_accuracy", "reward_margin", "reward_mean", "kl"):  # dpo, grpo
        if name in record:
            parts.append(f"{name} {record[name]:.3f}")
    if "router_max_load" in record:
        parts.append(f"router max/mean load {record['router_max_load']:.2f}")
    return " | ".join(parts)
