"""`l4jax train`: its flags (the model's here, the run's derived from `TrainConfig`'s fields),
the configs built from them, logging, multi-process start-up, and the run itself, which picks
the task: pretraining, or sft/dpo/grpo with LoRA (`l4jax.post`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax

from l4jax.config import CONTEXT_PARALLEL_LAYOUTS, PRESETS, REMAT_POLICIES, Llama4Config, preset
from l4jax.post import make_task
from l4jax.post.init_from import init_from_config
from l4jax.train import train
from l4jax.train_config import GROUPS, TrainConfig, add_config_arguments, config_from_args
from pipelines.packing import tokenizer_for


def add_train_arguments(p: Any) -> None:
    """The `l4jax train` flags (an argparse parser): the model's, multi-process start-up, and
    every flagged field of `TrainConfig`."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    model = groups["model"]
    model.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    model.add_argument("--config", help="a Hugging Face config.json (instead of --preset)")
    model.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    model.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="master weights")
    model.add_argument("--moe-impl", choices=("auto", "ragged_dot", "pallas", "megablox", "dense"))
    model.add_argument("--remat", choices=REMAT_POLICIES, help="rematerialisation policy")
    model.add_argument(
        "--context-parallel-layout",
        choices=CONTEXT_PARALLEL_LAYOUTS,
        help="global layers' token order on a `sequence` mesh (zigzag: causal load balance)",
    )
    par = groups["parallelism"]
    par.add_argument("--coordinator", help="multi-process: coordinator host:port")
    par.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    par.add_argument("--process-id", type=int, help="multi-process: this process's index")
    par.add_argument(
        "--distributed", action="store_true", help="jax.distributed.initialize() (TPU pods)"
    )
    groups["checkpoints and metrics"].add_argument(
        "--no-checkpoint", action="store_true", help="train without checkpoints"
    )
    add_config_arguments(groups)


def _initialize_distributed(args: Any) -> None:
    if args.coordinator or args.num_processes:
        # CPU devices of several processes talk through gloo (no effect on TPU/GPU)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.distributed:
        jax.distributed.initialize()


def model_config_from_args(args: Any) -> Llama4Config:
    runtime = {
        name: value
        for name, value in (
            ("dtype", args.dtype),
            ("param_dtype", args.param_dtype),
            ("moe_impl", args.moe_impl),
            ("remat_policy", args.remat),
            ("context_parallel_layout", args.context_parallel_layout),
        )
        if value is not None
    }
    if getattr(args, "init_from", None):  # the checkpoint's own model
        return init_from_config(args.init_from, **runtime)
    if args.config:
        return Llama4Config.from_json_file(args.config, **runtime)
    return preset(args.preset, **runtime)


def train_config_from_args(args: Any) -> TrainConfig:
    """The flags' `TrainConfig`; checkpoints default to runs/<preset or config's directory>,
    metrics to <checkpoint dir>/metrics.jsonl."""
    tc = config_from_args(args)
    directory = None
    if not args.no_checkpoint:
        name = Path(args.config).parent.name if args.config else args.preset
        directory = tc.checkpoint.directory or str(Path("runs") / name)
    metrics = tc.logging.metrics_jsonl or (
        str(Path(directory) / "metrics.jsonl") if directory else None
    )
    return dataclasses.replace(
        tc,
        checkpoint=dataclasses.replace(tc.checkpoint, directory=directory),
        logging=dataclasses.replace(tc.logging, metrics_jsonl=metrics),
    )


def configure_train_logging() -> None:
    """INFO lines of l4jax, pipelines and sharding on stderr as `l4jax train: ...`. Idempotent:
    a second in-process call replaces its own handler instead of adding one (lines once)."""
    handler = logging.StreamHandler()
    handler.set_name("l4jax train")
    handler.setFormatter(logging.Formatter("l4jax train: %(message)s"))
    for name in ("l4jax", "pipelines", "sharding"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "l4jax train"]:
            logger.removeHandler(old)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def run_cli(args: Any) -> int:
    """`l4jax train`: train, checkpoint, resume, report, and sample from the model."""
    _initialize_distributed(args)
    if not args.verbose:  # with -v the root logger already shows everything
        configure_train_logging()
    config = model_config_from_args(args)
    tc = train_config_from_args(args)
    primary = jax.process_index() == 0
    if primary:
        where = tc.checkpoint.directory or "no checkpoints"
        platform = jax.devices()[0].platform
        print(
            f"l4jax train: {args.config or 'preset ' + repr(args.preset)}, "
            f"{config.num_hidden_layers} layers, {config.num_local_experts} experts "
            f"(top-{config.num_experts_per_tok}, shared expert), {tc.steps} steps of "
            f"{tc.batch_size}x{tc.seq_len} tokens, {jax.device_count()} {platform} "
            f"device(s) in {jax.process_count()} process(es) -> {where}",
            flush=True,
        )
    start = time.perf_counter()
    tokenizer = tokenizer_for(config, tc.data.tokenizer)
    task = None  # pretraining
    if tc.task != "pretrain":  # sft, dpo, grpo, LoRA
        task = functools.partial(make_task, config, tc, tokenizer)
    result = train(config, tc, tokenizer=tokenizer, task=task)
    if primary:
        ran = sorted(result.losses)
        if ran:
            first, last = result.losses[ran[0]], result.losses[ran[-1]]
            print(
                f"l4jax train: steps {ran[0]}..{ran[-1]}: loss {first:.3f} -> {last:.3f} "
                f"in {time.perf_counter() - start:.0f} s (train step compile "
                f"{result.compile_seconds:.1f} s)"
            )
        else:
            print(f"l4jax train: already at step {result.start_step} of {tc.steps}")
        if result.sample is not None:
            print(f"l4jax train: sample (temperature {tc.sample.temperature}):\n{result.sample}")
    return 0
