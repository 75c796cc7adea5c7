"""The training loop: `train(config, tc)` reads Grain batches, runs the train step
(`l4jax.train_step`), saves Orbax checkpoints (params, optimizer, step, iterator) every
`save_every` steps, resumes from the latest one, reports loss, grad norm, tokens/s, MFU and
router load (`l4jax.train_metrics`) to stdout, a progress bar, TensorBoard and a JSONL file, and
samples from the model at the end.

The same code runs on one CPU, on simulated devices, on several processes and on a TPU pod.
`l4jax train` (`l4jax.train_cli`) picks the task: pretraining, or sft/dpo/grpo (`l4jax.post`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.model import Llama4ForCausalLM
from l4jax.train_config import TrainConfig
from l4jax.train_metrics import MetricsWriter, flops_per_token, log_line, step_record
from l4jax.train_step import Trainer, TrainState
from l4jax.train_task import Task

__all__ = ["TrainResult", "sample_text", "train"]

log = logging.getLogger(__name__)
COMPILE_BARRIER_TIMEOUT_S = 3600  # the slowest host's compile of a large model


def sample_text(
    config: Llama4Config,
    params: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.7,
    seed: int = 0,
) -> str:
    """`prompt` and a sampled continuation (`l4jax.generate`, KV-cached decoding)."""
    from l4jax.decoding import generate

    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    stops = [i for i in getattr(tokenizer, "stop_tokens", []) if i < config.vocab_size]
    ids = generate(
        Llama4ForCausalLM(config), params, prompt_ids, max_new_tokens,
        temperature=temperature, seed=seed, stop_ids=stops,
        pad_id=getattr(tokenizer, "pad_id", None),
    )[0, len(prompt_ids) :]  # fmt: skip
    new = []
    for token in ids.tolist():
        if token in stops:
            break
        new.append(token)
    return prompt + tokenizer.decode(new)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    losses: dict[int, float]  # step -> loss of the steps this call ran
    start_step: int
    compile_seconds: float
    sample: str | None


def train(
    config: Llama4Config,
    tc: TrainConfig,
    *,
    source: Any = None,
    tokenizer: Any = None,
    mesh: Mesh | None = None,
    sample: bool = True,
    task: Task | Callable[[Mesh], Task] | None = None,
) -> TrainResult:
    """Train `config` as `tc` says; resumes from `tc.checkpoint.directory` when it holds a
    checkpoint.

    `task` (default: pretraining) gives the objective, the data and the trainable params; for
    `tc.task` sft/dpo/grpo pass `l4jax.post.make_task`'s (`l4jax.train_cli` does)."""
    if task is None and tc.task != "pretrain":
        raise ConfigError(
            f"TrainConfig.task {tc.task!r}: pass its task (l4jax.post.make_task), as `l4jax "
            "train` does"
        )
    from tqdm.auto import tqdm

    from l4jax.checkpoint import TrainCheckpointer, write_run_config
    from l4jax.inputs import check_positions, check_tokenizer
    from pipelines import DataConfig, make_dataset, to_global_array, tokenizer_for
    from pipelines.sources import default_corpus, open_source

    tokenizer = tokenizer or tokenizer_for(config, tc.data.tokenizer)
    check_tokenizer(tokenizer, config.vocab_size)
    check_positions(tc.seq_len, config.max_position_embeddings, "--seq-len")
    trainer = Trainer(config, tc, mesh, task)
    log.info(
        "mesh %s, %s parameters (%s active per token)",
        dict(trainer.mesh.shape),
        f"{config.num_params():,}",
        f"{config.num_params(active=True):,}",
    )
    if trainer.task.data is not None:
        iterator, description = trainer.task.data()
        log.info("%s data: %s, tokenizer %r", tc.task, description, tokenizer)
    else:
        if source is None:
            source = open_source(tc.data.path, tc.data.field) if tc.data.path else default_corpus()
        log.info("data: %r, tokenizer %r", source, tokenizer)
        data_config = DataConfig(
            tc.seq_len, tc.batch_size, tc.seed, tc.data.workers, vocab_size=config.vocab_size
        )
        iterator = iter(make_dataset(source, tokenizer, data_config))
    checkpointer = None
    start = 0
    if tc.checkpoint.directory:
        # config.json makes each step an l4jax checkpoint: only when it holds the full model
        full = trainer.task.model_params is None
        checkpointer = TrainCheckpointer(  # (first: it locks the directory)
            tc.checkpoint.directory,
            tc.checkpoint.keep,
            tc.checkpoint.async_save,
            config=config if full else None,
        )
        write_run_config(tc.checkpoint.directory, config, dataclasses.asdict(tc))
        latest = checkpointer.latest_step()
    else:
        latest = None
    if latest is not None:
        state = checkpointer.restore(latest, trainer.abstract_state(), iterator)
        start = latest
        log.warning("resumed from %s at step %d", tc.checkpoint.directory, latest)
    else:
        state = trainer.init(tc.seed)
    compile_seconds = 0.0
    if start < tc.steps:
        compile_seconds = trainer.compile(state)
        log.info("train step compiled in %.1f s", compile_seconds)
        if jax.process_count() > 1:
            # hosts finish compiling at different times, and the first step's collectives
            # wait only so long for a late one (Gloo on CPU: 30 s): all hosts meet here first
            # (the coordination service's barrier, through Orbax's public wrapper)
            import orbax.checkpoint as ocp

            sync = ocp.multihost.get_barrier_sync_fn()
            sync(key="l4jax_train_compiled", timeout_ms=COMPILE_BARRIER_TIMEOUT_S * 1000)
    fpt = flops_per_token(config, tc.seq_len)
    writer = MetricsWriter(tc, start)
    losses: dict[int, float] = {}
    bar = tqdm(
        total=tc.steps, initial=start, desc="train", unit="step",
        disable=not tc.logging.progress or jax.process_index() != 0 or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )  # fmt: skip
    pending = None  # (step, metrics on device): read one step late, so dispatch runs ahead

    def report(step, metrics, done_time):
        nonlocal last_time
        host = {**jax.device_get(metrics[0]), **metrics[1]}
        seconds, last_time = done_time - last_time, done_time
        record, frac = step_record(step, host, seconds, tc, fpt)
        losses[step] = record["loss"]
        writer.write(record, frac)
        postfix = {"loss": f"{record['loss']:.3f}"}
        if "tokens_per_s" in record:
            postfix["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if (step % tc.logging.log_every == 0 or step == tc.steps) and jax.process_index() == 0:
            if tc.logging.progress:
                bar.write(log_line(record))
            else:
                log.info(log_line(record))

    last_time = time.perf_counter()
    try:
        for step in range(start + 1, tc.steps + 1):
            if trainer.task.prepare is not None:  # e.g. GRPO rollouts from the current policy
                batch, host_metrics = trainer.task.prepare(state, next(iterator))
            else:
                batch = to_global_array(next(iterator), trainer.batch_sharding)
                host_metrics = {}
            state, metrics = trainer.step(state, batch)
            if pending is not None:
                jax.block_until_ready(pending[1][0]["loss"])
                report(pending[0], pending[1], time.perf_counter())
            pending = (step, (metrics, host_metrics))
            if checkpointer and (step % tc.checkpoint.save_every == 0 or step == tc.steps):
                checkpointer.save(step, state, iterator)
        if pending is not None:
            jax.block_until_ready(pending[1][0]["loss"])
            report(pending[0], pending[1], time.perf_counter())
    finally:
        bar.close()
        writer.close()
        if checkpointer:
            checkpointer.close()
        if hasattr(iterator, "close"):
            iterator.close()
    text = None
    if sample and tc.sample.tokens > 0 and jax.process_count() > 1:
        log.info("no sample at the end of a multi-process run (sample from the checkpoint)")
    elif sample and tc.sample.tokens > 0:
        params = state.params
        if trainer.task.model_params is not None:
            params = trainer.task.model_params(params)
        text = sample_text(
            config, params, tokenizer, tc.sample.prompt, tc.sample.tokens,
            tc.sample.temperature, tc.seed,
        )  # fmt: skip
    return TrainResult(state, losses, start, compile_seconds, text)
