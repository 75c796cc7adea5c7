"""Streaming conversion's peak host memory, bounded in a child process (the benchmark,
benchmarks/convert_memory.py, measures the same thing on GB checkpoints against loading
everything; this keeps a bound in the suite)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from l4jax.config import Llama4Config
from l4jax.convert.mapping import hf_entries

ROOT = Path(__file__).resolve().parent.parent
# few layers, large experts: ~150 MB in bf16 (expert gate_up tensors of 17 MB each)
CONFIG = Llama4Config.make(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=512,
    intermediate_size_mlp=1024,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    num_local_experts=16,
    num_hidden_layers=6,
    interleave_moe_layer_step=1,
    attention_chunk_size=8192,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# The child: imports first (their RSS is the baseline), then one conversion; the kernel's
# peak RSS of the process (ru_maxrss, KiB) minus the baseline is what the conversion held.
CHILD = """
import resource, sys
import l4jax.convert.conversion as c
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c.convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def _write_checkpoint(path: Path) -> int:
    path.mkdir()
    rng = np.random.default_rng(0)
    tensors, weight_map, shard, total = {}, {}, 0, 0
    for entry in hf_entries(CONFIG):
        bits = rng.integers(0, 2**16, entry.hf_shape, dtype=np.uint16) & 0xBFFF  # |x| < 2
        tensors[entry.hf_key] = bits.view(ml_dtypes.bfloat16)
        total += tensors[entry.hf_key].nbytes
        if sum(t.nbytes for t in tensors.values()) > 40e6:  # several files, as HF writes
            shard += 1
            save_file(tensors, path / f"model-{shard:05d}.safetensors", {"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, f"model-{shard:05d}.safetensors"))
            tensors = {}
    if tensors:
        shard += 1
        save_file(tensors, path / f"model-{shard:05d}.safetensors", {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f"model-{shard:05d}.safetensors"))
    config = CONFIG.replace(param_dtype="bfloat16").to_hf_dict()
    (path / "config.json").write_text(json.dumps(config))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def test_streaming_conversion_peak_memory_is_bounded(tmp_path):
    nbytes = _write_checkpoint(tmp_path / "hf")
    largest = max(math.prod(e.hf_shape) for e in hf_entries(CONFIG)) * 2
    assert nbytes > 100e6 and largest < 0.15 * nbytes
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "hf"), str(tmp_path / "l4jax")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    grown = int(run.stdout.split()[-1])
    # streaming holds a few pieces at a time (measured 22 MB of 178 MB); loading everything
    # would hold >= the checkpoint (200 MB measured); 25% is the benchmark target
    assert grown < 0.25 * nbytes, f"peak RSS grew {grown / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB"
