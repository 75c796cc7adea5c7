"""Training checkpoints with Orbax: params, optimizer state, step and data-iterator state.

A run directory looks like

    run_dir/
      config.json             Llama4Config.to_hf_dict() of the model being trained
      train_config.json       the TrainConfig of the run (informational)
      <step>/config.json      (added once the step is complete) with <step>/params/, this makes
      <step>/params/          every step an l4jax checkpoint directory: Orbax PyTree checkpoint
                              of the scanned param tree, read by `restore_run(run_dir)`,
                              `export_run_hf(run_dir, dst)` and `l4jax convert <step dir> ...`
      <step>/opt_state/       Orbax PyTree checkpoint of the optax state
      <step>/meta/            JSON: {"step": ...}
      <step>/data/            Grain iterator state, one JSON file per process

Saves are asynchronous (the training loop continues while arrays are written), atomic (Orbax
writes to a temporary directory and renames it when every host is done, so a run killed
mid-save leaves the previous checkpoint intact) and keep the last `keep` steps. A save that
fails (a full disk) is a one-line `CheckpointError` naming the directory, the step and the
cause, raised at the next save or at the end of the run; the unfinished step's temporary
directory is removed, so a rerun resumes from the last complete step. Restoring takes target
shardings, so a checkpoint saved on one mesh restores onto any other (resharding).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from l4jax.config import Llama4Config
from l4jax.convert.orbax import restore_params
from l4jax.convert.streaming import remove_settled
from l4jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
ITEMS = ("params", "opt_state", "meta", "data")
LOCK_FILE = "train.lock"  # held (flock) by the process 0 of the run writing the directory


def lock_run_dir(directory: str | os.PathLike) -> int | None:
    """Hold `directory`'s lock file for this process (process 0 of a run; others get None), or
    CheckpointError if another run holds it. The kernel drops the lock when the holder exits,
    `kill -9` included, so a stale lock file never blocks a rerun."""
    if jax.process_index() != 0:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointError(
            f"{directory}: in use by another l4jax train (pid {holder}, {path}); wait for it "
            "or use another --checkpoint-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class TrainCheckpointer:
    """Orbax CheckpointManager for training state; every process calls every method."""

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        async_save: bool = True,
        config: Llama4Config | None = None,
    ):
        """`config`: when given, every finished step directory also gets `config.json`,
        which makes it an l4jax checkpoint (`l4jax convert`, `restore_params`). The directory
        is locked (`lock_run_dir`) until `close()`: a second run on it is refused."""
        self.directory = Path(directory).absolute()
        self._lock = lock_run_dir(self.directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._saving: int | None = None  # the step of the save in flight, if any
        # Orbax's writer threads log their exception before it is re-raised to us; we report it
        # as one CheckpointError line (`_failed`), so that log record is dropped while we run
        # (and asyncio's, for the other writes of that save). When a write fails, TensorStore
        # also completes the other writes' futures on an event loop Orbax has already closed:
        # each is an unraisable `Event loop is closed` (hundreds of tracebacks for one full
        # disk). Both are dropped until a clean close(); after a failure, until exit.
        self._failure = False
        self._quiet = _DropOrbaxThreadErrors()
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self._quiet)
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._drop_closed_loop

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Start saving `state` (a TrainState) and the iterator's position as `step`."""
        self._stamp_config()
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "meta": ocp.args.JsonSave({"step": int(step)}),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._failed():
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._saving = step
            if jax.process_index() == 0:
                log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restore `step` onto the shardings of `abstract_state` (a TrainState of
        `jax.ShapeDtypeStruct`s with `.sharding`), and the iterator's position in place."""
        items = {
            "params": ocp.args.StandardRestore(abstract_state.params),
            "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore ({e})") from None
        step_array = jax.device_put(
            jax.numpy.asarray(restored["meta"]["step"], abstract_state.step.dtype),
            abstract_state.step.sharding,
        )
        return abstract_state.replace(
            step=step_array, params=restored["params"], opt_state=restored["opt_state"]
        )

    def _stamp_config(self) -> None:
        """config.json into every finished step directory (after Orbax renamed it in place)."""
        with self._failed():
            self.manager.wait_until_finished()
        self._saving = None
        if self.config is None or jax.process_index() != 0:
            return
        for step in self.manager.all_steps():
            path = self.directory / str(step) / CONFIG_FILE
            if path.parent.is_dir() and not path.exists():
                self.config.to_json_file(path)

    def wait(self) -> None:
        self._stamp_config()

    def close(self) -> None:
        try:
            self._stamp_config()
        finally:
            try:
                self.manager.close()
            except (ValueError, OSError, RuntimeError):
                pass  # the save's failure was raised above; closing re-reports it
            if self._failure and jax.process_index() == 0:
                # the unfinished step (a rerun's CheckpointManager would remove it too:
                # cleanup_tmp_directories)
                remove_settled(self.directory, "*.orbax-checkpoint-tmp*")
            if not self._failure:
                for name in ("absl", "asyncio"):
                    logging.getLogger(name).removeFilter(self._quiet)
                if sys.unraisablehook == self._drop_closed_loop:
                    sys.unraisablehook = self._unraisable
            if self._lock is not None:
                os.close(self._lock)  # (releases the flock)
                self._lock = None

    def _drop_closed_loop(self, unraisable: Any) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            self._unraisable(unraisable)

    @contextlib.contextmanager
    def _failed(self) -> Iterator[None]:
        """A failed asynchronous save (surfacing at the next Orbax call) -> CheckpointError
        naming the directory, the step and the cause (e.g. `File too large` for a full disk);
        `close()` removes the step's temporary directory; earlier complete steps are untouched."""
        try:
            yield
        except (ValueError, OSError, RuntimeError) as e:
            step, self._saving, self._failure = self._saving, None, True
            last = self.manager.latest_step()
            resume = f"a rerun resumes from step {last}" if last is not None else "no step saved"
            raise CheckpointError(
                f"{self.directory}: saving checkpoint step {step} failed ({_cause(e)}); {resume}"
            ) from e


class _DropOrbaxThreadErrors(logging.Filter):
    """Drops Orbax's ERROR records about a failed background save (the same failure is re-raised
    to the caller, which reports it once as a CheckpointError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        where = record.pathname + record.getMessage()  # (asyncio's names the orbax coroutine)
        return not (record.levelno >= logging.ERROR and "orbax" in where)


def _cause(e: BaseException) -> str:
    """The operating system's reason inside an Orbax/TensorStore error (`File too large`,
    `No space left on device`), else the error's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    found = re.findall(r": ([A-Z][^:\[\]]*?) \[os_error_code", text)
    return found[-1] if found else text.splitlines()[0][:200] if text else type(e).__name__


# ---- run directory metadata ------------------------------------------------------------------


def write_run_config(
    directory: str | os.PathLike, config: Llama4Config, train_config: dict[str, Any]
) -> None:
    """Write config.json (checking it matches an existing run) and train_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    if path.exists():
        stored = Llama4Config.from_json_file(path).to_hf_dict()
        current = config.to_hf_dict()
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if diff:
            raise ConfigError(
                f"{path}: the run in {directory} trains a different model (fields {diff} differ);"
                " use another --checkpoint-dir"
            )
    if jax.process_index() != 0:
        return
    config.to_json_file(path)
    tmp = directory / f"{TRAIN_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(train_config, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / TRAIN_CONFIG_FILE)


def read_run_config(directory: str | os.PathLike, **runtime: Any) -> Llama4Config:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not an l4jax training run")
    return Llama4Config.from_json_file(path, **runtime)


def is_training_run(directory: str | os.PathLike) -> bool:
    """Whether `directory` is an l4jax training run (its config.json and step directories), as
    opposed to a checkpoint (`--init-from` and `from_pretrained` accept both)."""
    d = Path(directory)
    return (d / CONFIG_FILE).is_file() and any(c.name.isdigit() for c in d.iterdir())


def step_dir(
    directory: str | os.PathLike, step: int | None = None, holding: str = CONFIG_FILE
) -> Path:
    """The directory of a finished step of a run (default: the latest): a numbered directory
    holding `holding` (a training step's config.json; a LoRA run's steps hold only `params`)."""
    directory = Path(directory).absolute()
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
    steps = [s for s in steps if (directory / str(s) / holding).exists()]
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint steps")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory}: no finished step {step} (have {steps})")
    return directory / str(step)


def restore_run(
    directory: str | os.PathLike, step: int | None = None, shardings: Any = None, **runtime: Any
) -> tuple[Llama4Config, Any]:
    """(config, params) of a run's step (default: the latest) through the conversion code's
    `restore_params`: onto `shardings` (one sharding, or a tree like the params) or, by
    default, the first device."""
    return restore_params(step_dir(directory, step), shardings, **runtime)


def export_run_hf(
    directory: str | os.PathLike, dst: str | os.PathLike, step: int | None = None
) -> Path:
    """Export a training run's step (default: latest) as a Hugging Face checkpoint directory,
    through the conversion code (`l4jax.convert.export.export_hf`)."""
    try:
        from l4jax.convert.export import export_hf
    except ImportError as e:
        raise CheckpointError(f"Hugging Face export is unavailable: {e}") from None
    config, params = restore_run(directory, step)
    return export_hf(params, config, dst)
