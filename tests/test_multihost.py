"""Two processes (jax.distributed on CPU, gloo collectives) train one model together,
checkpoint, get killed with SIGKILL, resume, and end bit-identical to an uninterrupted run."""

import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import ROOT, read_losses, subprocess_env, wait_for_step_then_kill

from l4jax import preset
from l4jax.checkpoint import restore_run

STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(config_file, run_dir, env):
    """Both processes of one job: 2 CPU devices each, a 4-device mesh across them."""
    port = _free_port()
    common = [
        sys.executable, "-m", "l4jax", "train", "--config", str(config_file),
        "--steps", str(STEPS), "--save-every", "4", "--batch-size", "8", "--seq-len", "32",
        "--mesh", "fsdp=2,expert=2", "--checkpoint-dir", str(run_dir), "--sample-tokens", "0",
        "--no-progress", "--log-every", "1000", "--coordinator", f"localhost:{port}",
        "--num-processes", "2",
    ]  # fmt: skip
    return [
        subprocess.Popen(
            [*common, "--process-id", str(i)],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(2)
    ]


def _finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    return outs


@pytest.mark.slow
def test_two_processes_train_checkpoint_kill_and_resume(tmp_path):
    config_file = tmp_path / "config.json"
    preset("tiny", num_hidden_layers=2).to_json_file(config_file)
    env = subprocess_env(tmp_path, devices=2)
    full = tmp_path / "full"
    _finish(_launch(config_file, full, env))
    data_state = sorted(p.name for p in (full / str(STEPS) / "data").glob("process_*.json"))
    assert data_state == ["process_0-of-2.json", "process_1-of-2.json"]  # one iterator each

    killed = tmp_path / "killed"
    procs = _launch(config_file, killed, env)
    wait_for_step_then_kill(procs, killed, saved_step=4)
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    outs = _finish(_launch(config_file, killed, env))
    assert "resumed from" in outs[0]

    want, got = read_losses(full / "metrics.jsonl"), read_losses(killed / "metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want
    _, want_params = restore_run(full)
    _, got_params = restore_run(killed)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(a, b)
