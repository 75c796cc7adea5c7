"""Test setup: 8 simulated CPU devices (set before JAX initialises), shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The longest test files first (the order of their totals in a `--durations` run), so the two
# workers of the README's `pytest -n 2 --dist loadfile` pick them up early and finish together
# instead of one worker running a long file alone at the end. Order only; keep it roughly
# sorted when files grow (`pytest --durations=0`).
SLOWEST_FIRST = (
    "test_post_cli.py",
    "test_train.py",
    "test_generate.py",
    "test_long_context.py",
    "test_context_parallel.py",
    "test_model.py",
    "test_docs.py",
    "test_post.py",
    "test_multihost.py",
    "test_sharding.py",
    "test_notebook.py",
    "test_bad_input.py",
    "test_vision.py",
    "test_quantization.py",
    "test_quantized_checkpoint.py",
    "test_qlora.py",
    "test_hf_parity.py",
    "test_hf_fp8.py",
    "test_expert_parallel.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: file order kept)
