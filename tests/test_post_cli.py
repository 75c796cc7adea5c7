"""Post-training from the command line: --init-from, --data, LoRA, merge-lora, HF export, GRPO
rewards from a file, and kill -9 resume of sft and dpo runs. (Apart from tests/test_post.py so
that `pytest -n 2 --dist loadfile` runs these subprocess-heavy tests beside the library ones.)
A 2-layer tiny model (one dense layer, one MoE layer) keeps the compiles short."""

import json
import math
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import ROOT, read_losses, subprocess_env, wait_for_step_then_kill

from l4jax import preset

TINY2 = preset("tiny", num_hidden_layers=2)


@pytest.mark.slow
def test_cli_sft_lora_merge_export_and_grpo_reward_file(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from l4jax.checkpoint import restore_run
    from l4jax.cli import main
    from l4jax.convert import from_pretrained
    from l4jax.post.demo import sft_rows
    from l4jax.post.lora import LoraConfig, adapter_layout, apply_variables

    monkeypatch.chdir(tmp_path)
    TINY2.to_json_file(tmp_path / "tiny2.json")
    common = ["--config", "tiny2.json", "--batch-size", "8", "--seq-len", "64",
              "--sample-tokens", "0", "--no-progress", "--mesh", "fsdp=8"]  # fmt: skip
    assert main(["train", "--steps", "2", "--checkpoint-dir", "base", *common]) == 0
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(32)))
    sft = ["train", "--task", "sft", "--init-from", "base", "--data", "chats.jsonl",
           "--lora-rank", "4", "--lora-targets", "attention,experts", "--lr", "1e-2",
           "--steps", "3", "--checkpoint-dir", "lora", *common]  # fmt: skip
    assert main(sft) == 0
    assert not (tmp_path / "lora" / "3" / "config.json").exists()  # adapters, not a model
    assert main(["merge-lora", "lora", "merged"]) == 0
    model, merged = from_pretrained(tmp_path / "merged")
    assert model.config.num_hidden_layers == 2
    # the merged checkpoint is the adapter model: base + the run's adapters
    _, base = restore_run(tmp_path / "base")
    lora = LoraConfig(4, 16.0, ("attention", "experts"))
    shapes, _ = adapter_layout(model.config, lora)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes)
    adapters = ocp.StandardCheckpointer().restore(tmp_path / "lora" / "3" / "params", shapes)
    tokens = jnp.asarray(np.arange(16).reshape(1, 16) + 60)
    want = model.apply(apply_variables(base, adapters, lora), tokens)
    got = model.apply({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert main(["convert", "merged", "merged-hf", "--to", "hf"]) == 0
    _, hf = from_pretrained(tmp_path / "merged-hf")
    for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # GRPO with a reward from a file: called with prompts, completions and the row's fields
    (tmp_path / "my_reward.py").write_text(
        "def short(prompts, completions, answer, **_):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    grpo = ["train", "--task", "grpo", "--reward", "my_reward.py:short", "--steps", "2",
            "--num-generations", "4", "--max-new-tokens", "4", "--lora-rank", "2",
            "--checkpoint-dir", "grpo", *common]  # fmt: skip
    assert main(grpo) == 0
    records = [
        json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "reward_mean", "reward_std", "kl"} <= set(records[0])
    bad = [{"my_reward.py:short": "nowhere.py:f"}.get(x, x) for x in grpo]
    bad[bad.index("--checkpoint-dir") + 1] = "bad"
    assert main(bad) == 2  # a reward that cannot be loaded: exit 2, one line


# ---- kill -9 and resume ---------------------------------------------------------------------


def _post_cmd(config_file, run_dir, steps, task):
    return [
        sys.executable, "-m", "l4jax", "train", "--task", task, "--config", str(config_file),
        "--steps", str(steps), "--save-every", "4", "--batch-size", "8", "--seq-len", "64",
        "--mesh", "fsdp=4,expert=2", "--checkpoint-dir", str(run_dir), "--sample-tokens", "0",
        "--no-progress", "--log-every", "1000",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_kill_9_and_resume_is_bit_identical(tmp_path, task):
    from l4jax.checkpoint import restore_run

    env = subprocess_env(tmp_path)
    config_file = tmp_path / "tiny2.json"
    TINY2.to_json_file(config_file)
    steps = 10  # saves at 4, 8 and 10: killed past 4, resumed from 4 or 8
    full = tmp_path / "full"
    cmd = lambda run_dir: _post_cmd(config_file, run_dir, steps, task)  # noqa: E731
    subprocess.run(cmd(full), env=env, check=True, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd(killed), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    wait_for_step_then_kill([proc], killed, saved_step=4)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(cmd(killed), env=env, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    want, got = read_losses(full / "metrics.jsonl"), read_losses(killed / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # exact float equality, every step
    if task == "dpo":
        assert want[1] == pytest.approx(math.log(2), abs=1e-6)
    _, want_params = restore_run(full)
    _, got_params = restore_run(killed)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(a, b)
