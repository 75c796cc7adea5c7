"""Training: the loss falls, checkpoints resume bit-identically after kill -9, restore reshards,
metrics and FLOP accounting."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from l4jax import from_pretrained, preset
from l4jax.checkpoint import TrainCheckpointer, export_run_hf, restore_run, write_run_config
from l4jax.errors import ConfigError
from l4jax.train import train
from l4jax.train_cli import configure_train_logging
from l4jax.train_config import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    SampleConfig,
    TrainConfig,
)
from l4jax.train_metrics import flops_per_token
from l4jax.train_step import Trainer
from pipelines import ByteTokenizer
from sharding import make_mesh

ROOT = Path(__file__).resolve().parent.parent
TINY = preset("tiny")


def _train_cmd(run_dir: Path, steps: int, extra=()) -> list[str]:
    """`l4jax train` of a 2-layer tiny model (one dense, one MoE layer: a short compile), whose
    config.json is written next to `run_dir`."""
    config = run_dir.parent / "tiny2.json"
    if not config.exists():
        preset("tiny", num_hidden_layers=2).to_json_file(config)
    return [
        sys.executable, "-m", "l4jax", "train", "--config", str(config), "--steps", str(steps),
        "--save-every", "4", "--batch-size", "8", "--seq-len", "32", "--mesh", "fsdp=4,expert=2",
        "--checkpoint-dir", str(run_dir), "--sample-tokens", "0", "--no-progress",
        "--log-every", "1000", *extra,
    ]  # fmt: skip


def subprocess_env(tmp_path: Path, devices: int = 8) -> dict[str, str]:
    """Same device count as the tests; a shared compilation cache so reruns skip compiling."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def read_losses(path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def wait_for_step_then_kill(procs, run_dir: Path, saved_step: int, timeout: float = 600) -> None:
    """SIGKILL every process once checkpoint `saved_step` is complete and training has gone
    past it (so the kill lands between checkpoints)."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        done = (run_dir / str(saved_step) / "commit_success.txt").exists() or (
            run_dir / str(saved_step) / "_CHECKPOINT_METADATA"
        ).exists()
        if done and metrics.exists() and max(read_losses(metrics), default=0) > saved_step:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
            return
        if any(p.poll() is not None for p in procs):
            outs = [p.communicate()[0] for p in procs]
            pytest.fail(f"training ended before it could be killed: {outs}")
        time.sleep(0.01)
    pytest.fail("training did not reach the checkpoint in time")


@pytest.mark.slow
def test_loss_falls_and_checkpoints_are_written(tmp_path):
    tc = TrainConfig(
        steps=30, batch_size=8, seq_len=64,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
        checkpoint=CheckpointConfig(str(tmp_path / "run"), save_every=10),
        logging=LoggingConfig(100, metrics_jsonl=str(tmp_path / "m.jsonl"), progress=False),
        sample=SampleConfig(tokens=16),
    )  # fmt: skip
    result = train(TINY, tc, mesh=make_mesh("fsdp=8"))
    losses = read_losses(tmp_path / "m.jsonl")
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 1
    assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [
        10, 20, 30
    ]  # fmt: skip
    assert result.sample.startswith(tc.sample.prompt)
    record = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert {"grad_norm", "lr", "tokens_per_s", "mfu", "router_load"} <= set(record)
    assert len(record["router_load"]) == TINY.num_local_experts
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # the saved params are an l4jax param tree: load them back onto one device
    config, params = restore_run(tmp_path / "run")
    assert config.to_hf_dict() == TINY.to_hf_dict()
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(got, np.asarray(want))
    # ... and exported through the conversion code to a Hugging Face checkpoint
    export_run_hf(tmp_path / "run", tmp_path / "hf")
    _, hf_params = from_pretrained(tmp_path / "hf")
    for got, want in zip(jax.tree.leaves(hf_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # a finished run is resumed at its end: nothing more to do
    again = train(TINY, tc, mesh=make_mesh("fsdp=8"), sample=False)
    assert again.start_step == 30 and not again.losses


@pytest.mark.slow
def test_kill_9_and_resume_is_bit_identical(tmp_path):
    env = subprocess_env(tmp_path)
    steps = 24
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, steps), env=env, check=True, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(killed, steps), env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_step_then_kill([proc], killed, saved_step=8)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        _train_cmd(killed, steps), env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    want, got = read_losses(full / "metrics.jsonl"), read_losses(killed / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # exact float equality, every step
    _, want_params = restore_run(full)
    _, got_params = restore_run(killed)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_another_mesh_reshards(tmp_path):
    tc = TrainConfig(batch_size=8, seq_len=32)
    saver = Trainer(TINY, tc, make_mesh("fsdp=8"))
    state = saver.init(seed=3)
    checkpointer = TrainCheckpointer(tmp_path / "ckpt")
    checkpointer.save(5, state)
    checkpointer.close()
    loader = Trainer(TINY, tc, make_mesh("fsdp=2,expert=4"))
    restored = TrainCheckpointer(tmp_path / "ckpt").restore(5, loader.abstract_state())
    assert int(restored.step) == 5
    for got, want, sharding in zip(
        jax.tree.leaves((restored.params, restored.opt_state)),
        jax.tree.leaves((state.params, state.opt_state)),
        jax.tree.leaves((loader.state_shardings.params, loader.state_shardings.opt_state)),
    ):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_changed_model_in_same_run_dir_is_refused(tmp_path):
    write_run_config(tmp_path, TINY, {})
    write_run_config(tmp_path, TINY, {"steps": 2})  # same model: fine
    with pytest.raises(ConfigError, match="different model"):
        write_run_config(tmp_path, preset("tiny", hidden_size=32), {})


def test_flops_per_token_counts_active_experts_and_attention():
    moe16 = preset("moe16")
    dense_like = moe16.replace(num_experts_per_tok=2)
    d, f = moe16.hidden_size, moe16.intermediate_size
    per_expert = 6 * 3 * d * f * len(moe16.moe_layers)
    assert flops_per_token(dense_like, 256) - flops_per_token(moe16, 256) == per_expert
    # attention grows with length on global layers, stops at the chunk on chunked layers
    short, long = flops_per_token(moe16, 256), flops_per_token(moe16, 2048)
    nope_layers = moe16.num_hidden_layers - sum(moe16.chunked_layers)
    n_h = moe16.num_attention_heads * moe16.head_dim
    assert long - short == pytest.approx(12 * n_h * (2048 - 256) / 2 * nope_layers)


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids[1:-1]) < 256
    assert tok.decode(ids) == "héllo\n"


@pytest.mark.slow
def test_train_step_keeps_no_stacked_copy_of_the_expert_weights():
    """The scanned layers' backward reads each layer's expert weights from the params; it must
    not save them as stacked residuals (+1x expert weights per step: a `lax.cond`, e.g.
    `platform_dependent`, around the grouped matmul did that). With few tokens the step's
    temporaries are the gradients plus a few layer slices, well under 2.5x the params."""
    config = preset("tiny", num_hidden_layers=8, num_local_experts=64, vocab_size=256)
    tc = TrainConfig(batch_size=1, seq_len=16, optimizer=OptimizerConfig(warmup_steps=0))
    trainer = Trainer(config, tc, make_mesh("", devices=jax.devices()[:1]))
    trainer.compile(trainer.abstract_state())
    param_bytes = 4 * config.num_params()
    assert config.num_hidden_layers // config.scan_period >= 2  # a real scan over groups
    assert trainer._step.memory_analysis().temp_size_in_bytes < 2.5 * param_bytes


def test_train_logging_configured_once_per_process(capsys):
    """`run_cli` called twice in one process (tests, notebooks) logs each line once."""
    import logging

    loggers = [logging.getLogger(name) for name in ("l4jax", "pipelines", "sharding")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        others = [[h for h in lg.handlers if h.get_name() != "l4jax train"] for lg in loggers]
        configure_train_logging()
        configure_train_logging()
        # one handler of ours per logger, and whatever else was there (pytest's, or another
        # test's in this worker) left alone
        ours = [[h for h in lg.handlers if h.get_name() == "l4jax train"] for lg in loggers]
        assert [len(h) for h in ours] == [1, 1, 1]
        assert [[h for h in lg.handlers if h not in o] for lg, o in zip(loggers, ours)] == others
        logging.getLogger("l4jax.train").info("one line")
        assert capsys.readouterr().err.count("l4jax train: one line") == 1
    finally:  # the handler writes to capsys's stream: leave the loggers as they were
        for lg, (handlers, level, propagate) in zip(loggers, saved):
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def test_train_flags_are_derived_from_the_config_fields():
    """Every flagged field of `TrainConfig` (nested ones too) has its flag, with the field's
    default; a parsed command line comes back as the config it names."""
    import argparse

    from l4jax.train_config import GROUPS, PostConfig, add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments({name: parser.add_argument_group(name) for name in GROUPS})
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    argv = ["--lr", "0.02", "--save-every", "7", "--no-progress", "--data", "d.jsonl"]
    argv += ["--task", "grpo", "--lora-targets", "q_proj,v_proj", "--no-dynamic-filtering"]
    got = config_from_args(parser.parse_args(argv))
    want = TrainConfig(
        task="grpo",
        optimizer=OptimizerConfig(learning_rate=0.02),
        checkpoint=CheckpointConfig(save_every=7),
        logging=LoggingConfig(progress=False),
        data=dataclasses.replace(TrainConfig().data, path="d.jsonl"),
        post=PostConfig(lora_targets=("q_proj", "v_proj"), dynamic_filtering=False),
    )
    assert got == want


def test_post_training_task_without_its_task_is_refused():
    """`train` runs pretraining unless given the task (`l4jax train` picks it by --task)."""
    tc = TrainConfig(task="sft", checkpoint=CheckpointConfig(None))
    with pytest.raises(ConfigError, match="TrainConfig.task 'sft'"):
        train(TINY, tc, sample=False)
