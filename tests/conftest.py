"""Test setup: 8 simulated CPU devices (set before JAX initialises), shared fixtures."""

import os
import shutil
import tempfile

import pytest

# 8 simulated devices; LLVM at -O0: most of the suite's time is XLA:CPU compiling small models,
# and -O0 cuts it by a fifth here. Codegen changes fp32 rounding (contraction, reduction order)
# the way another CPU would, so tolerances are what fp32 allows, not the bits of one build.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache for the whole run: most tests compile the same small
# models, and the CLI/doc tests compile them again in child processes. The process that first
# imports this file (pytest, or xdist's controller) makes the directory; xdist workers and every
# child process inherit it through the environment, and the creator removes it at the end.
# A user's own JAX_COMPILATION_CACHE_DIR is used and left alone. (Children that are killed -9 or
# starved of disk set a per-test directory or run without a cache, so a half-written entry never
# reaches this one.)
CACHE_OWNER = "L4JAX_TEST_JIT_CACHE_OWNER"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="l4jax-test-jit-cache-")
    os.environ[CACHE_OWNER] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
    if os.environ.get(CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The longest test files first (the order of their totals in a `--durations` run), so the two
# workers of the README's `pytest -n 2 --dist loadfile` pick them up early and finish together
# instead of one worker running a long file alone at the end. Order only; keep it roughly
# sorted when files grow (`pytest --durations=0`).
SLOWEST_FIRST = (
    # only slow tests: first in a `-m slow` run, absent from the default one
    "test_post_cli.py",
    "test_multihost.py",
    "test_notebook.py",
    # the default run's per-file totals, longest first
    "test_quantization.py",
    "test_sharding.py",
    "test_hf_parity.py",
    "test_generate.py",
    "test_model.py",
    "test_docs.py",
    "test_vision.py",
    "test_expert_parallel.py",
    "test_gmm.py",
    "test_bad_input.py",
    "test_attention.py",
    "test_convert.py",
    "test_qlora.py",
    "test_pipelines.py",
    "test_moe.py",
    "test_post.py",
    "test_long_context.py",
    "test_context_parallel.py",
    "test_train.py",
    "test_tokenizer.py",
    "test_quantized_checkpoint.py",
    "test_convert_multimodal.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: file order kept)


@pytest.fixture
def traced_lengths(monkeypatch):
    """`traced_lengths(method)`: a list that gets the query length (`q.shape[1]`) of every
    traced call of `l4jax.context_parallel.ContextParallel.<method>` (which attention went
    context-parallel)."""
    from l4jax.context_parallel import ContextParallel

    def watch(method: str) -> list[int]:
        lengths: list[int] = []
        original = getattr(ContextParallel, method)

        def counting(cp, impl, q, *rest):
            lengths.append(q.shape[1])
            return original(cp, impl, q, *rest)

        monkeypatch.setattr(ContextParallel, method, counting)
        return lengths

    return watch
