"""Bad input and faults (docs/reliability.md): each a one-line error (exit 2 on the CLI, no
traceback), nothing left behind, and a rerun that works once the cause is gone."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import TOP2_LIKE, build_hf_model

import l4jax
from l4jax import generate
from l4jax.checkpoint import lock_run_dir
from l4jax.cli import main
from l4jax.convert.conversion import convert_checkpoint
from l4jax.convert.streaming import remove_settled
from l4jax.errors import CheckpointError, ConfigError, InputError
from l4jax.train import train
from l4jax.train_config import CheckpointConfig, TrainConfig
from pipelines import ByteTokenizer, DataConfig, make_dataset
from pipelines.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
TINY = l4jax.preset("tiny", vocab_size=300)


def cli_fails(capsys, argv: list[str], match: str) -> None:
    """`l4jax ARGV` exits 2 with one error line on stderr (after any log lines), no traceback."""
    for name in ("", "l4jax", "pipelines", "sharding"):  # handlers an earlier `main` bound to
        logger = logging.getLogger(name)  # an earlier test's (now closed) captured stderr
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"l4jax {argv[0]}: error: "), err
    assert err.rstrip().endswith(errors[0]) and match in errors[0], err


def run_python(code: str, *args: str, limit_bytes: int | None = None):
    """A child python; `limit_bytes`: RLIMIT_FSIZE (writes past it fail with EFBIG, as on a
    full disk; SIGXFSZ ignored so the write returns the error)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    # These children are killed or starved of disk mid-write: keep them out of the run's shared
    # compilation cache (conftest), where a half-written entry would outlive them.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"

    def limit() -> None:
        if limit_bytes is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, cwd=ROOT, env=env, preexec_fn=limit,
    )  # fmt: skip


# ---- token ids and lengths -------------------------------------------------------------------


def test_token_ids_out_of_range_and_what_apply_does():
    """`generate` refuses them; `model.apply` (jitted, unchecked) gives NaN logits: documented in
    l4jax/inputs.py and docs/reliability.md."""
    config = l4jax.preset("tiny", num_hidden_layers=1, vocab_size=64, moe_impl="dense")
    model = l4jax.Llama4ForCausalLM(config)
    for bad in (64, -1):
        with pytest.raises(InputError, match=f"prompt 1: token id {bad} outside the model's"):
            generate(model, None, [[1, 2], [3, bad]], max_new_tokens=2)
    params = l4jax.init_params(config, rng=0)
    logits = model.apply({"params": params}, jnp.array([[1, 2], [1, 64]]))
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()  # (NaN reaches every
    # position of the sequence: a masked attention weight of 0 times NaN is NaN)


def test_prompt_longer_than_max_position_embeddings(capsys):
    """`l4jax generate` on `tiny` (4,096 positions) used to take a 3,000-word prompt and exit 0."""
    prompt = " ".join(["word"] * 5000)
    argv = ["generate", "--preset", "tiny", "--prompt", prompt, "--max-new-tokens", "4"]
    cli_fails(capsys, argv, "more than the model's max_position_embeddings 4096")
    config = l4jax.preset("tiny", max_position_embeddings=16)
    with pytest.raises(InputError, match="prompt \\+ max_new_tokens: 18 tokens"):
        generate(l4jax.Llama4ForCausalLM(config), None, [list(range(10))], max_new_tokens=8)


class WideTokenizer(ByteTokenizer):
    """Claims the byte vocabulary but emits an id past it (a tokenizer/model mismatch)."""

    def encode(self, text, **kwargs):
        return [*super().encode(text, **kwargs), 400]


def test_data_pipeline_checks_token_ids():
    data = make_dataset(["some text"] * 4, WideTokenizer(), DataConfig(8, 2, vocab_size=300))
    with pytest.raises(InputError, match="token id 400 outside the model's vocabulary"):
        next(iter(data))


def test_training_sequence_longer_than_max_position_embeddings(tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--seq-len", "8192", "--steps", "1"]
    cli_fails(capsys, [*argv, "--checkpoint-dir", str(tmp_path / "run")], "--seq-len: 8192")
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_model(tmp_path):
    from l4jax.tokenizer import Tokenizer

    tc = TrainConfig(
        steps=1, batch_size=8, seq_len=32, checkpoint=CheckpointConfig(str(tmp_path / "run"))
    )
    with pytest.raises(InputError, match="ids but the model's vocab_size is 300"):
        train(TINY, tc, tokenizer=Tokenizer.default(), sample=False)
    assert not (tmp_path / "run").exists()


def test_tokenizer_file_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "tokenizer.model").write_bytes(os.urandom(300))
    argv = ["train", "--preset", "tiny", "--tokenizer", str(tmp_path / "tokenizer.model")]
    cli_fails(capsys, argv, "is neither a tiktoken BPE file (tokenizer.model) nor a tokenizer.json")


def test_jsonl_with_a_broken_line_names_the_line_before_compiling(tmp_path, capsys):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(ConfigError, match=f"{bad}:4: not valid JSON"):
        open_source(bad)  # (opening reads every line: before the model is even built)
    (tmp_path / "field.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ConfigError, match="field.jsonl:2: no string field 'text'"):
        open_source(tmp_path / "field.jsonl")
    cli_fails(capsys, ["train", "--preset", "tiny", "--data", str(bad)], "docs.jsonl:4: not valid")


# ---- training runs -----------------------------------------------------------------------------


def test_second_train_on_the_same_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    held = lock_run_dir(run)
    try:
        argv = ["train", "--preset", "tiny", "--steps", "1", "--checkpoint-dir", str(run)]
        cli_fails(capsys, argv, f"{run}: in use by another l4jax train (pid {os.getpid()}")
        assert sorted(p.name for p in run.iterdir()) == ["train.lock"]  # nothing written
    finally:
        os.close(held)
    # a holder killed with -9 leaves the lock file but not the lock
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from l4jax.checkpoint import lock_run_dir; "
         "lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"pid {child.pid}"):
            lock_run_dir(run)
    finally:
        child.kill()
        child.wait()
    os.close(lock_run_dir(run))


KILL_MID_SAVE = """
import os, signal, sys
import grain
from l4jax.cli import main
save, calls = grain.checkpoint.CheckpointHandler.save, []
def save_then_die(self, *args, **kwargs):  # the data item of step 3: params may be on disk
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, *args, **kwargs)
grain.checkpoint.CheckpointHandler.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_save_resumes_from_the_last_complete_step(tmp_path):
    run, config = tmp_path / "run", tmp_path / "config.json"
    l4jax.preset("tiny", num_hidden_layers=1).to_json_file(config)  # (a short compile)
    argv = [
        "train", "--config", str(config), "--steps", "4", "--save-every", "1", "--batch-size",
        "8", "--seq-len", "32", "--checkpoint-dir", str(run), "--sample-tokens", "0",
        "--no-progress",
    ]  # fmt: skip
    killed = run_python(KILL_MID_SAVE, *argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = sorted(int(p.name) for p in run.iterdir() if p.name.isdigit())
    assert done and done == list(range(1, done[-1] + 1)) and done[-1] <= 2, done  # not step 3
    rerun = run_python("import sys; from l4jax.cli import main; sys.exit(main(sys.argv[1:]))",
                       *argv)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {run} at step {done[-1]}" in rerun.stderr, rerun.stderr
    assert f"steps {done[-1] + 1}..4" in rerun.stdout, rerun.stdout


TRAIN = "import sys; from l4jax.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_disk_full_during_a_training_checkpoint_save(tmp_path):
    """Orbax's background save fails on a full disk: one line naming the directory, step and
    cause, exit 2, the unfinished step removed; once space is back the rerun trains and saves."""
    run, config = tmp_path / "run", tmp_path / "config.json"
    l4jax.preset("tiny", num_hidden_layers=1).to_json_file(config)  # (a short compile)
    argv = [
        "train", "--config", str(config), "--steps", "1", "--batch-size", "8", "--seq-len", "16",
        "--checkpoint-dir", str(run), "--sample-tokens", "0", "--no-progress",
    ]  # fmt: skip
    full = run_python(TRAIN, *argv, limit_bytes=100_000)  # the metrics fit, the arrays do not
    assert full.returncode == 2, full.stderr
    err = full.stderr.strip().splitlines()
    assert err[-1] == (
        f"l4jax train: error: {run}: saving checkpoint step 1 failed (File too large); "
        "no step saved"
    ), full.stderr
    assert all(line.startswith("l4jax train: ") for line in err), full.stderr  # no traceback
    assert sorted(p.name for p in run.iterdir() if "orbax" in p.name or p.name.isdigit()) == []
    rerun = run_python(TRAIN, *argv)
    assert rerun.returncode == 0, rerun.stderr
    assert (run / "1" / "config.json").is_file()


def test_a_failed_saves_late_writes_are_removed_too(tmp_path):
    """A failed Orbax save raises at its first failed write while its other writes may still
    land, recreating the directory one `rmtree` removed (CI saw `1.orbax-checkpoint-tmp/params
    .orbax-checkpoint-tmp/_sharding` left behind): removal repeats until nothing reappears."""
    step = tmp_path / "1.orbax-checkpoint-tmp"

    def late_write():
        time.sleep(0.3)  # (after the first removal)
        (step / "params.orbax-checkpoint-tmp").mkdir(parents=True)
        (step / "params.orbax-checkpoint-tmp" / "_sharding").write_text("{}")

    (step / "params").mkdir(parents=True)
    (tmp_path / "1").mkdir()  # a complete step: not the pattern's
    writer = threading.Thread(target=late_write)
    writer.start()
    remove_settled(tmp_path, "*.orbax-checkpoint-tmp*", quiet_s=0.6)
    writer.join()
    assert [p.name for p in tmp_path.iterdir()] == ["1"]


# ---- conversion faults and corrupt checkpoints ------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(HF dir, l4jax dir) of a small model."""
    root = tmp_path_factory.mktemp("small")
    build_hf_model(TOP2_LIKE, seed=7).save_pretrained(root / "hf")
    convert_checkpoint(root / "hf", root / "l4jax", progress=False)
    return root / "hf", root / "l4jax"


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_chunk_and_garbage_config(small, tmp_path, capsys):
    ckpt = copy_tree(small[1], tmp_path / "ckpt")
    chunk = next((ckpt / "params" / "layers.layer_1.feed_forward.down_proj").glob("*.*.*"))
    chunk.write_bytes(chunk.read_bytes()[:10])
    cli_fails(capsys, ["convert", str(ckpt), str(tmp_path / "out"), "--to", "hf"], chunk.name)
    (ckpt / "config.json").write_text("{garbage")
    cli_fails(capsys, ["convert", str(ckpt), str(tmp_path / "out")], "config.json: not valid JSON")
    assert not (tmp_path / "out").exists()


CONVERT = "import sys; from l4jax.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("to", ["l4jax", "hf"])
def test_disk_full_during_convert(small, tmp_path, to):
    dst = tmp_path / "out" / "dst"
    full = run_python(CONVERT, "convert", str(small[0]), str(dst), "--to", to, limit_bytes=30_000)
    assert full.returncode == 2, full.stderr
    err = full.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l4jax convert: error: "), full.stderr
    assert "File too large" in err[0], err
    assert list((tmp_path / "out").iterdir()) == []  # nothing left behind
    rerun = run_python(CONVERT, "convert", str(small[0]), str(dst), "--to", to)
    assert rerun.returncode == 0, rerun.stderr


KILL_MID_CONVERT = """
import os, signal, sys
from l4jax.convert import orbax
from l4jax.cli import main
write, calls = orbax.L4jaxWriter.write, []
def write_then_die(self, *args):
    write(self, *args)
    calls.append(1)
    if len(calls) == 10:
        os.kill(os.getpid(), signal.SIGKILL)
orbax.L4jaxWriter.write = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_convert(small, tmp_path):
    dst = tmp_path / "out" / "dst"
    killed = run_python(KILL_MID_CONVERT, "convert", str(small[0]), str(dst))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (partial,) = (tmp_path / "out").iterdir()  # no destination; a partial directory
    assert partial.name.startswith("dst.partial-") and not dst.exists()
    with pytest.raises(CheckpointError):
        l4jax.from_pretrained(partial)
    rerun = run_python(CONVERT, "convert", str(small[0]), str(dst))
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dst"]  # the stale one removed
    assert json.loads((dst / "config.json").read_text())["num_local_experts"] > 0


def test_verify_prints_the_mismatch_and_exits_1(small, monkeypatch, capsys):
    """`l4jax verify` can fail: an l4jax loader bug (one weight 1% off) is reported."""
    import l4jax.verify as verify_mod

    load = verify_mod.from_pretrained

    def misread(*args, **kwargs):
        model, params = load(*args, **kwargs)
        return model, {**params, "lm_head": params["lm_head"] * 1.01}

    monkeypatch.setattr(verify_mod, "from_pretrained", misread)
    assert main(["verify", str(small[0]), "--tokens", "16"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "logits against transformers" in out[0]
    assert out[1].strip().startswith("ragged_dot") and out[1].strip().endswith("MISMATCH"), out
