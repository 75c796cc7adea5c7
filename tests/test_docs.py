"""Every command in README.md, docs/*.md and benchmarks/README.md is run here, or mapped to the
test that runs its code path; a command in neither table fails `test_every_doc_command_is_covered`
with the file, line and command, so the docs stay covered as they change.

What counts as a command (`collect`):

1. every line of a fenced ```bash / ```sh / ```shell / ```console block (in ```console only the
   `$ ` lines, prompt removed), after joining backslash continuations and dropping `#` comments
   (outside quotes);
2. every line of an unlabeled ``` block whose first line starts with a command word (other
   unlabeled blocks are layouts, diagrams and printed tables);
3. every inline code span that starts with a command word, e.g. `l4jax verify SRC`,
   `python benchmarks/decode.py`, `pip install 'l4jax[data]'`, also bare `l4jax train`.

Command words: `l4jax`, `python`, `python3`, `pip`, `pip3`, `tensorboard`, `.ci/run` and any
`<dir>/bin/<program>`. Every fenced ```python block is a snippet (`PYTHON`, keyed by its file and
first line); snippets are executed.

Each command, by its exact text (as collected above), is in one table:

- `RUN`: run for real by `test_doc_file_runs[FILE]`, which follows FILE top to bottom in a fresh
  directory (its `WORKSPACE`: tiny random checkpoints etc. under the very names the doc uses),
  running its RUN commands and executing its ```python snippets in document order (the snippets of
  a file share one namespace, as a reader's session would). The table gives the command that is
  run: the doc's text, or the doc's text with large arguments made small or a name changed (a
  comment says why); it must exit with the given status, and its stdout and stderr must match
  `expect` and `expect_err` (regexes). A command found in several places runs at its first.
  `l4jax ARGS` runs as `l4jax.cli.main(ARGS)` in this process (the function the `l4jax` console
  script calls; `test_console_script_is_the_cli`), for speed: one import, one set of compiled
  functions. `python ...` runs as a subprocess in the repository root (the docs' paths are
  relative to it).
- `COVERED`: commands too heavy for CI (a full demo training run, a TPU pod launch), installs,
  and synopses with placeholders, mapped to the test node(s) that run the same code path;
  `test_covered_node_ids_exist` checks that each node's test function exists.

Benchmark rule: the `python benchmarks/...` commands in benchmarks/README.md's table (and the
same commands elsewhere) are records of measurements, not re-run here (minutes to hours each);
`test_benchmark_commands_use_existing_flags` checks that every flag they use is still in the
script's `--help`, and `--part roofline` (arithmetic only) is run and must print the README's
roofline table.
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
DOC_FILES += ["benchmarks/README.md"]

COMMAND = re.compile(r"(l4jax|python3?|pip3?|tensorboard|\.ci/run|[\w./-]*/bin/[\w.-]+)(\s|$)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclasses.dataclass(frozen=True)
class Run:
    """What `test_doc_file_runs` runs for a doc command, and what it must print."""

    cmd: str
    expect: str  # a regex that the stdout of each must match (re.search, re.MULTILINE)
    expect_err: str = ""  # ... and its stderr
    rc: int = 0  # expected exit status
    stdin: str = ""


@dataclasses.dataclass(frozen=True)
class Snippet:
    """How a ```python block runs: `setup` defines what the doc leaves to the reader (`tokens`,
    `mesh`, ...), `replace` makes (old, new) text substitutions, `check` must be true after."""

    check: str
    setup: str = ""
    replace: tuple[tuple[str, str], ...] = ()


# ---- what each doc file's directory holds before its commands run (built by `workspace`) ----
# hf: a random 2-layer MoE (SCOUT_LIKE: 4 experts, chunked attention; Llama 4's 202048-token
#     vocabulary), saved by transformers in bfloat16 with Llama 4's tokenizer.model, like a
#     downloaded HF checkpoint (2 layers of one kind: a scan over one layer, quick to compile);
# meta: a random Meta checkpoint (params.json + 2 fused consolidated.NN.pth shards, bfloat16);
# mm: a random multimodal HF checkpoint (vision_preset("tiny"): 56 px tiles) + tokenizer.model;
# hf-config: the hf model's config.json; tiny-config: 2 layers of 8 experts, 512-token vocab;
# corpus: a directory of text files;
# dialog: a chat JSON file; image: a small JPEG.
WORKSPACE: dict[str, dict[str, str]] = {
    "README.md": {
        "path/to/Llama-4-Scout-17B-16E-Instruct": "hf",
        "path/to/checkpoint": "hf",
        "config.json": "hf-config",
    },
    "docs/conversion.md": {
        "Llama-4-Scout-17B-16E-Instruct": "hf",
        "Llama-4-Maverick-17B-128E-Instruct-original": "meta",
    },
    "docs/inference.md": {
        "path/to/Llama-4-Scout-17B-16E-Instruct": "hf",
        "DIR": "hf",
        "dialog.json": "dialog",
    },
    "docs/moe.md": {"Llama-4-Scout-17B-16E-Instruct": "hf"},
    "docs/training.md": {"path/config.json": "tiny-config", "corpus": "corpus"},
    "docs/vision.md": {
        "Llama-4-Scout-17B-16E-Instruct": "mm",
        "...": "mm",
        "photo.jpg": "image",
        "a.png": "image",  # (a JPEG under that name: the CLI reads images by content)
        "b.png": "image",
        "dialog.json": "dialog",
    },
}

HELP = "tests/test_docs.py::test_benchmark_commands_use_existing_flags"
TRAIN_CLI = "tests/test_train.py::test_kill_9_and_resume_is_bit_identical"
TRAIN_RUN = "tests/test_train.py::test_loss_falls_and_checkpoints_are_written"
DEMO_DEFAULTS = "tests/test_docs.py::test_train_defaults_are_the_documented_demo"
MODULE_ENTRY = "tests/test_convert.py::test_module_entry_point_reports_errors_in_one_line"
CONVERT = "tests/test_convert.py::test_hf_l4jax_hf_round_trip_is_bit_identical"
VERIFY = "tests/test_convert.py::test_verify_meta_and_l4jax_checkpoints"
GENERATE_CLI = "tests/test_generate.py::test_cli_generate_chat_and_errors"
LONG_PROMPT = "tests/test_long_context.py::test_prompt_longer_than_max_positions_is_a_clear_error"
INFERENCE_DOC = "tests/test_docs.py::test_doc_file_runs"  # [docs/inference.md]
IMAGE_CLI = "tests/test_vision.py::test_generate_cli_with_image"
EXTRAS = "tests/test_docs.py::test_pip_extras_named_in_the_docs_exist"

# doc command -> what is run (see the module docstring)
RUN: dict[str, Run] = {
    # README.md (demo preset, 2 x 256 tokens: about 30 s; tiny preset, 1 x 32 tokens)
    "l4jax check": Run(
        "l4jax check --preset tiny --tokens 32 --batch 1",
        r"ragged_dot\s+max\|diff\|/max\|logit\| = \S+\s+ok[\s\S]*ratio \d",
    ),
    # docs/conversion.md
    "l4jax convert Llama-4-Scout-17B-16E-Instruct scout-l4jax": Run(
        "l4jax convert Llama-4-Scout-17B-16E-Instruct scout-l4jax",
        r"\(hf\) -> scout-l4jax \(l4jax, bfloat16\): \d+ tensors",
    ),
    "l4jax convert Llama-4-Maverick-17B-128E-Instruct-original mav-l4jax": Run(
        "l4jax convert Llama-4-Maverick-17B-128E-Instruct-original mav-l4jax",
        r"\(meta\) -> mav-l4jax \(l4jax, bfloat16\): \d+ tensors",
    ),
    "l4jax convert scout-l4jax scout-hf --to hf": Run(
        "l4jax convert scout-l4jax scout-hf --to hf",
        r"scout-l4jax \(l4jax\) -> scout-hf \(hf, bfloat16\)",
    ),
    "l4jax convert scout-hf scout-l4jax-f32 --dtype float32": Run(
        "l4jax convert scout-hf scout-l4jax-f32 --dtype float32",
        r"scout-hf \(hf\) -> scout-l4jax-f32 \(l4jax, float32\)",
    ),
    # docs/inference.md (DIR is a directory of that name in the workspace)
    # (stdout is the streamed text: a random model's, so any; the same --max-new-tokens and
    # sampling share one compilation)
    'l4jax generate --checkpoint DIR --prompt "The capital of France is" --temperature 0': Run(
        'l4jax generate --checkpoint DIR --prompt "The capital of France is" --temperature 0',
        r"\S",
    ),
    "l4jax generate --checkpoint DIR --chat-json dialog.json": Run(
        "l4jax generate --checkpoint DIR --chat-json dialog.json --max-new-tokens 8", r"\S"
    ),
    'l4jax chat --checkpoint DIR --system "Be brief."': Run(
        'l4jax chat --checkpoint DIR --system "Be brief." --max-new-tokens 8',
        r"\Aassistant> (?![\s\S]*assistant> )[\s\S]*\S",  # one reply to one line
        stdin="Hello!\n",
    ),
    # docs/vision.md (a random multimodal checkpoint: any text; 8 new tokens)
    "l4jax generate --checkpoint Llama-4-Scout-17B-16E-Instruct --image photo.jpg --chat-json "
    "dialog.json --max-new-tokens 128": Run(
        "l4jax generate --checkpoint Llama-4-Scout-17B-16E-Instruct --image photo.jpg --chat-json "
        "dialog.json --max-new-tokens 8",
        r"\S",
    ),
    'l4jax generate --checkpoint ... --image a.png --image b.png --prompt "Two pictures:"': Run(
        'l4jax generate --checkpoint ... --image a.png --image b.png --prompt "Two pictures:" '
        "--max-new-tokens 8",
        r"\S",
    ),
    # docs/pods.md: the table's 107.8B and 17.2B
    "python -c \"from l4jax import preset; c = preset('scout'); "
    'print(c.num_params() / 1e9, c.num_params(active=True) / 1e9)"': Run(
        "python -c \"from l4jax import preset; c = preset('scout'); "
        'print(c.num_params() / 1e9, c.num_params(active=True) / 1e9)"',
        r"^107\.7\d* 17\.1\d*$",
    ),
    # docs/training.md: 8 devices here (the doc's mesh needs 16), 2 steps of 16 x 32 tokens
    "l4jax train --config path/config.json --data corpus/ --steps 20000 --batch-size 512 "
    "--seq-len 8192 --mesh data=2,fsdp=-1,expert=8 --checkpoint-dir gs-fuse/run1": Run(
        "l4jax train --config path/config.json --data corpus/ --steps 2 --batch-size 16 "
        "--seq-len 32 --mesh data=2,fsdp=-1,expert=4 --checkpoint-dir gs-fuse/run1 "
        "--sample-tokens 0 --no-progress",
        r"^l4jax train: path/config.json, 2 layers, 8 experts .* -> gs-fuse/run1$"
        r"[\s\S]*^l4jax train: steps 1\.\.2: loss",
        expect_err=r"mesh \{'data': 2, 'fsdp': 1, 'expert': 4"
        r"[\s\S]*saving step 2 to \S*gs-fuse/run1",
    ),
    # (the doc's 150-step demo run is the gs-fuse/run1 run above; demo-hf is the snippet's)
    "l4jax convert runs/demo/150 demo-hf --to hf": Run(
        "l4jax convert gs-fuse/run1/2 demo-hf-cli --to hf",
        r"gs-fuse/run1/2 \(l4jax\) -> demo-hf-cli \(hf, float32\)",
    ),
    "python xmanager/launch_tpu.py --name scout-ft --accelerator v5p-128 --zone us-east5-a "
    "--project my-project --num-slices 2 -- --preset scout --data /data --mesh data=2,fsdp=-1": Run(
        "python xmanager/launch_tpu.py --name scout-ft --accelerator v5p-128 --zone us-east5-a "
        "--project my-project --num-slices 2 -- --preset scout --data /data --mesh data=2,fsdp=-1",
        r"queued-resources create scout-ft[\s\S]*--accelerator-type v5p-128[\s\S]*"
        r"python3 -m l4jax train --preset scout --data /data --mesh data=2,fsdp=-1 --distributed",
    ),
}

# doc command -> test node(s) exercising the same code path
POST_CLI = "tests/test_post_cli.py::test_cli_sft_lora_merge_export_and_grpo_reward_file"
POST_RESUME = "tests/test_post_cli.py::test_kill_9_and_resume_is_bit_identical"
COVERED: dict[str, str | tuple[str, ...]] = {
    # docs/post_training.md
    "l4jax train --task sft --preset demo --steps 200": (POST_CLI, POST_RESUME),
    "l4jax train --task dpo --preset demo --steps 100 --beta 0.1": (
        POST_RESUME,
        "tests/test_post.py::test_dpo_starts_at_log2_and_learns_held_out_preferences",
    ),
    "l4jax train --task grpo --preset tiny --steps 40 --num-generations 8 --max-new-tokens 4": (
        POST_CLI,
        "tests/test_post.py::test_grpo_mean_reward_rises_on_the_reversal_task",
    ),
    "l4jax train --task sft --init-from runs/demo --data chats.jsonl --lora-rank 16": POST_CLI,
    "l4jax merge-lora RUN DST": POST_CLI,
    "l4jax generate --checkpoint DST": GENERATE_CLI,
    "l4jax convert DST HF_DIR --to hf": POST_CLI,
    # README.md. Quickstart line 1: CI runs it as written in a fresh venv (`.ci/run`, whose
    # checks the first test runs), `l4jax train` as below
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/l4jax train": (
        "tests/test_docs.py::test_ci_runs_both_readme_quickstart_lines",
        DEMO_DEFAULTS,
        TRAIN_CLI,
    ),
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest '
    '-q -n 2 --dist loadfile -m "not slow"': (
        "tests/test_docs.py::test_ci_runs_both_readme_quickstart_lines"
    ),
    ".venv/bin/python -m pytest -q -n 2 --dist loadfile -m slow": (
        "tests/test_docs.py::test_ci_runs_both_readme_quickstart_lines"
    ),
    ".ci/run": "tests/test_docs.py::test_ci_runs_both_readme_quickstart_lines",
    'pip install -e ".[torch]"': EXTRAS,
    "l4jax convert SRC DST [--to l4jax|hf] [--dtype bfloat16|float32] "
    "[--quantize MODE | --dequantize] [--allow-unexpected]": (
        CONVERT,
        "tests/test_convert.py::test_dtype_option_casts_like_numpy",
        "tests/test_quantized_checkpoint.py::test_quantized_checkpoint_exports_to_hf_only_with_dequantize",
        "tests/test_accounting.py::test_extra_tensor_in_a_shard_but_not_in_the_index",
    ),
    "l4jax verify SRC": VERIFY,
    "l4jax train": (DEMO_DEFAULTS, TRAIN_CLI, TRAIN_RUN),
    'l4jax generate --checkpoint DIR --prompt "..."': (INFERENCE_DOC, GENERATE_CLI),
    "l4jax chat --checkpoint DIR": (INFERENCE_DOC, GENERATE_CLI),
    'l4jax generate --checkpoint DIR --image photo.jpg --prompt "..."': IMAGE_CLI,
    'l4jax generate --preset tiny --prompt "Hi"': GENERATE_CLI,  # the same, with "Hello"
    "l4jax generate --prompt-file PATH": LONG_PROMPT,
    # docs/conversion.md
    "l4jax convert": CONVERT,
    "l4jax verify": VERIFY,
    "l4jax verify scout-l4jax": VERIFY,  # an l4jax checkpoint through transformers
    "l4jax verify SRC [--tokens 128]": VERIFY,
    "python -m l4jax convert ...": MODULE_ENTRY,
    "python benchmarks/convert_memory.py [--gb 4.0]": HELP,
    "l4jax convert Llama-4-Scout-17B-16E-Instruct scout-int4 --quantize int4": (
        "tests/test_quantized_checkpoint.py::test_quantized_checkpoint_holds_the_quantized_leaves"
    ),
    "l4jax convert scout-int4 scout-hf-bf16 --to hf --dequantize": (
        "tests/test_quantized_checkpoint.py::"
        "test_quantized_checkpoint_exports_to_hf_only_with_dequantize"
    ),
    "l4jax convert SRC DST --quantize int4": (
        "tests/test_quantized_checkpoint.py::test_quantized_checkpoint_holds_the_quantized_leaves"
    ),
    # docs/inference.md
    "l4jax generate": GENERATE_CLI,
    "l4jax chat": GENERATE_CLI,
    "l4jax generate (--checkpoint DIR | --preset NAME) "
    "(--prompt TEXT | --prompt-file PATH | --chat-json FILE)": (GENERATE_CLI),
    "python benchmarks/decode.py": HELP,
    # docs/moe.md
    "python benchmarks/moe.py": HELP,
    # docs/quantization.md
    "python benchmarks/quantize.py": HELP,
    'l4jax generate --checkpoint DIR --prompt "..." --quantize int4': (
        "tests/test_quantization.py::test_generate_cli_quantize"
    ),
    # docs/long_context.md
    "l4jax generate --checkpoint DIR --prompt-file PATH --mesh sequence=8": (
        "tests/test_context_parallel.py::test_generate_and_chat_cli_on_a_sequence_mesh_give_the_same_text"
    ),
    "l4jax chat --mesh ...": (
        "tests/test_context_parallel.py::test_generate_and_chat_cli_on_a_sequence_mesh_give_the_same_text"
    ),
    "l4jax train --context-parallel-layout zigzag": (
        "tests/test_context_parallel.py::test_train_flag_sets_the_layout"
    ),
    # docs/training.md
    "l4jax train --preset tiny --steps 50": TRAIN_CLI,  # the same CLI, tiny preset, 12 steps
    "tensorboard --logdir runs/demo/tensorboard": TRAIN_RUN,  # asserts the event files
    "pip install 'l4jax[data]'": EXTRAS,
    # docs/vision.md
    "l4jax generate --image": IMAGE_CLI,
    "l4jax chat --checkpoint Llama-4-Scout-17B-16E-Instruct --image photo.jpg --max-new-tokens "
    "128": "tests/test_vision.py::test_chat_cli_with_images",
    # benchmarks/README.md: measurement records (module docstring)
    "python benchmarks/NAME.py --help": HELP,
    "python benchmarks/moe.py --part model": HELP,
    "python benchmarks/quantize.py --parts speed": HELP,
    "python benchmarks/post_training.py --config moe16 --batch 4 --seq 256 --steps 3": HELP,
    "python benchmarks/quantize.py --parts roofline": HELP,
    "python benchmarks/quantize.py --parts quality --train-steps 150": HELP,
    "python benchmarks/moe.py --part layer --runs 7": HELP,
    "python benchmarks/moe.py --part layer --backends --runs 2 --experts 8 32 128": HELP,
    "python benchmarks/train.py --configs moe16 --steps 2": HELP,
    "python benchmarks/train.py --configs moe128 --layers 4 --batch 8 --memory-limit-gb 12 "
    "--steps 1": HELP,
    "python benchmarks/train.py --configs moe128 --steps 1": HELP,
    "python benchmarks/train.py --configs moe128 --batch 8 --steps 1": HELP,
    "python benchmarks/convert_memory.py --gb 4.0": HELP,
    "python benchmarks/convert_memory.py --gb 4.0 --no-naive --quantize int4": HELP,
    "python benchmarks/vision.py": HELP,
    "python benchmarks/long_context.py": HELP,
    "python benchmarks/long_context.py --config tiny --mode forward --lengths 8192 16384 32768 "
    "65536 131072": HELP,
    "python benchmarks/long_context.py --config scoutish --mode prefill --lengths 16384 --torch "
    "--warm": HELP,
    "python benchmarks/long_context.py --config vocab --mode prefill --new-tokens 4 --lengths "
    "32768": HELP,
    "python benchmarks/long_context.py --config tiny --mode prefill --lengths 262144 --timeout "
    "1300": HELP,
    "python benchmarks/long_context.py --config tiny --analysis --lengths 8192 16384 32768 65536 "
    "131072 262144": HELP,
    "python benchmarks/long_context.py --cp": HELP,
    "python benchmarks/long_context.py --config scoutish --mode prefill --lengths 16384 65536 "
    "--new-tokens 16 --kv-cache-dtypes float32 bfloat16 int8": HELP,
    "python benchmarks/long_context.py --cp --lengths 16384 65536": HELP,
    "python benchmarks/long_context.py --attention --lengths 4096 8192 --runs 5": HELP,
    # the same computation (`context_parallel.ring_work`), asserted
    "python benchmarks/long_context.py --cp-balance --lengths 65536 1048576 --shards 4 8 16": (
        "tests/test_context_parallel.py::test_zigzag_order_balances_the_causal_ring"
    ),
    "python benchmarks/long_context.py --cp-balance": (
        "tests/test_context_parallel.py::test_zigzag_order_balances_the_causal_ring"
    ),
    "python benchmarks/moe.py --part roofline": (
        "tests/test_docs.py::test_roofline_table_is_what_the_script_prints"
    ),
}

TOKENS = (
    "import numpy as np, jax.numpy as jnp\n"
    "tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 40)), jnp.int32)\n"
)

# (doc file, first line of a ```python block) -> how it runs
PYTHON: dict[tuple[str, str], Snippet] = {
    ("docs/post_training.md", "def has_digit(prompts, completions, **fields):"): Snippet(
        check="has_digit(['p', 'p'], ['a1', 'b'], answer=['x', 'y']) == [1.0, 0.0]"
    ),
    ("README.md", "import jax.numpy as jnp"): Snippet(
        setup=TOKENS + "positions = jnp.asarray(np.tile(np.r_[0:20, 0:20], (2, 1)), jnp.int32)\n"
        "segment_ids = jnp.asarray(np.tile(np.repeat([1, 2], 20), (2, 1)), jnp.int32)\n"
        "prompt_a, prompt_b = [200000, 791, 6037], [200000, 9906]\n",
        check="logits.shape == (2, 40, 202048) and ids.shape == (2, 3 + 64) "
        "and int(ids[1, 0]) == 0 and config.vocab_size == 202048 "
        "and params['embed_tokens'].shape == (512, 64) "
        "and tok.decode(tok.encode('Hello', bos=False, eos=False)) == 'Hello'",
    ),
    ("docs/conversion.md", "import orbax.checkpoint as ocp"): Snippet(
        setup="import jax, l4jax\n"
        "from pathlib import Path\n"
        "from l4jax.convert import restore_params\n"
        'DST = Path("scout-l4jax")\n'
        "_cfg, _want = restore_params(DST)\n"
        "abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, "
        "sharding=a.sharding), _want)\n",
        check="all((a == b).all() for a, b in zip(jax.tree.leaves(params), "
        "jax.tree.leaves(_want))) and len(jax.tree.leaves(params)) > 10",
    ),
    (
        "docs/conversion.md",
        "from l4jax.convert import convert_checkpoint, export_hf, restore_params, from_pretrained",
    ): Snippet(
        # scout-l4jax and scout-hf were written by the commands above: new names here
        replace=(
            (
                'convert_checkpoint("scout-hf", "scout-l4jax"',
                'convert_checkpoint("scout-hf", "new"',
            ),
        ),
        setup="import jax\nshardings = jax.sharding.SingleDeviceSharding(jax.devices()[1])\n",
        check="result.dst_format == 'l4jax' and result.tensors > 10 "
        "and Path('scout-hf-2/model.safetensors.index.json').is_file() "
        "and json.loads(Path('scout-hf-2/config.json').read_text())['torch_dtype'] == 'bfloat16'",
    ),
    ("docs/conversion.md", "import flax.linen as nn"): Snippet(
        setup="from sharding import make_mesh, logical_rules\n"
        'mesh, rules = make_mesh("fsdp=8"), logical_rules()\n',
        check="params['layers']['layer_0']['feed_forward']['gate_proj'].sharding.mesh.shape"
        "['fsdp'] == 8 and config.vocab_size == 202048",
    ),
    ("docs/inference.md", "import l4jax"): Snippet(
        check="ids.shape == (1, len(prompt) + 128) and ids[0, : len(prompt)].tolist() == prompt "
        "and prompt[0] == tok.bos_id and model.config.dtype == 'bfloat16'",
    ),
    ("docs/moe.md", 'model, params = l4jax.from_pretrained(path, moe_impl="pallas")'): Snippet(
        setup='import l4jax\npath = "Llama-4-Scout-17B-16E-Instruct"\n',
        check="model.config.moe_impl == 'pallas'",
    ),
    (
        "docs/moe.md",
        'logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])',
    ): Snippet(
        setup="import jax\n" + TOKENS,
        # [groups, E] per slot of the scanned group: 2 layers (groups) of 4 experts, 2 x 40
        # tokens to the top-1 expert in each
        check="[(x.shape, x.sum(axis=1).tolist()) for x in jax.tree.leaves(loads)] "
        "== [((2, 4), [80, 80])]",
    ),
    ("docs/moe.md", "import jax, flax.linen as nn"): Snippet(
        setup="import numpy as np\none_device = logits\n",
        # the logits of one device, on 8 (bfloat16 compute, the checkpoint's dtype: 1e-2)
        check="len(logits.sharding.device_set) == 8 and np.abs(np.asarray(logits, np.float32) "
        "- np.asarray(one_device, np.float32)).max() < 3e-2 * np.abs(np.asarray(one_device, "
        "np.float32)).max()",
    ),
    ("docs/quantization.md", "import jax.numpy as jnp"): Snippet(
        check="logits.shape == (1, 8, config.vocab_size) and "
        "len(l4jax.quantization.quantized_leaves(params_q)) == 12",
    ),
    ("docs/training.md", "from l4jax import preset"): Snippet(
        setup="import numpy as np, jax.numpy as jnp\n"
        "batch = {k: jnp.asarray(v, jnp.int32) for k, v in dict(\n"
        "    tokens=np.random.default_rng(0).integers(0, 512, (8, 64)),\n"
        "    segment_ids=np.ones((8, 64)), positions=np.tile(np.arange(64), (8, 1))).items()}\n",
        check="int(state.step) == 1 and 5 < float(metrics['loss']) < 8",
    ),
    ("docs/training.md", "from l4jax.checkpoint import restore_run, export_run_hf"): Snippet(
        # the doc's runs/demo is the 2-step gs-fuse/run1 run above
        replace=(('"runs/demo"', '"gs-fuse/run1"'),),
        check="config.num_local_experts == 8 and Path('demo-hf/config.json').is_file() "
        "and len(jax.tree.leaves(params)) > 10",
        setup="import jax\nfrom pathlib import Path\n",
    ),
    ("docs/vision.md", "from pathlib import Path"): Snippet(
        check="pixel_values.shape == (3, 3, 56, 56) and ids.count(200092) == 3 * 4 "
        "and logits.shape == (1, len(ids), 202048)",
    ),
}


# ---- collecting commands -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    file: str
    line: int
    kind: str  # "command" or "python"
    text: str  # the command, or the block's source

    @property
    def key(self) -> str | tuple[str, str]:
        return self.text if self.kind == "command" else (self.file, self.text.splitlines()[0])

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text.splitlines()[0]}"


def strip_comment(line: str) -> str:
    """`line` without a shell `#` comment (a `#` at the start or after a blank, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_lines(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(offset, command) of a block's lines, continuations joined, comments dropped."""
    i = 0
    while i < len(lines):
        start, parts = i, []
        while True:
            text = strip_comment(lines[i])
            continued = text.endswith("\\")
            parts.append(text[:-1].strip() if continued else text.strip())
            i += 1
            if not continued or i == len(lines):
                break
        command = " ".join(p for p in parts if p)
        if command:
            yield start, command


def collect(file: str) -> list[Item]:
    lines = (ROOT / file).read_text().splitlines()
    items: list[Item] = []
    prose: list[str] = []  # the text outside fences, fenced lines blanked (keeps line numbers)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), len(lines))
        body = lines[i + 1 : end]
        if lang in ("python", "py"):
            items.append(Item(file, i + 2, "python", "\n".join(body).strip("\n")))
        elif lang in SHELL_LANGS or (lang == "" and body and COMMAND.match(body[0].strip())):
            if lang == "console":
                body = [b.strip()[2:] if b.strip().startswith("$ ") else "" for b in body]
            for offset, command in shell_lines(body):
                items.append(Item(file, i + 2 + offset, "command", command))
        prose += [""] * (end + 1 - i)
        i = end + 1
    text = "\n".join(prose)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        code = " ".join(m.group(1).split())
        if COMMAND.match(code):
            items.append(Item(file, text.count("\n", 0, m.start()) + 1, "command", code))
    return sorted(items, key=lambda item: item.line)


ITEMS = {file: collect(file) for file in DOC_FILES}
FIRST: dict[str, Item] = {}  # a command found in several places runs at its first
for _item in (item for items in ITEMS.values() for item in items):
    FIRST.setdefault(_item.text, _item)


def test_the_collector_finds_what_the_rule_says():
    assert list(shell_lines(["a \\", "  b # c", "", "# d", "e '#f' g#h # i"])) == [
        (0, "a b"),
        (4, "e '#f' g#h"),
    ]
    readme = ITEMS["README.md"]
    assert readme[0].kind == "command" and readme[0].line == 11
    assert [i.text for i in readme[:2]] == (ROOT / "README.md").read_text().split("```bash\n")[
        1
    ].splitlines()[:2]
    assert any(i.kind == "python" for i in readme)
    assert not any("HF dir" in i.text for i in readme)  # the unlabeled diagram
    assert "l4jax verify SRC" in [i.text for i in readme]  # inline code


def test_every_doc_command_is_covered():
    missing = []
    for items in ITEMS.values():
        for item in items:
            if item.kind == "python" and item.key not in PYTHON:
                missing.append(f"{item}  (```python block: add it to PYTHON)")
            if item.kind == "command" and item.text not in RUN and item.text not in COVERED:
                missing.append(f"{item}  (add it to RUN or COVERED)")
            if item.kind == "command" and item.text in RUN and item.text in COVERED:
                missing.append(f"{item}  (in both RUN and COVERED)")
    assert not missing, "doc commands not run or mapped to a test:\n" + "\n".join(missing)


def test_tables_have_no_stale_entries():
    found = {item.key for items in ITEMS.values() for item in items}
    stale = [repr(key) for key in [*RUN, *COVERED, *PYTHON] if key not in found]
    assert not stale, "table entries no doc contains any more:\n" + "\n".join(stale)


def test_covered_node_ids_exist():
    nodes = {n for v in COVERED.values() for n in ((v,) if isinstance(v, str) else v)}
    for node in sorted(nodes):
        path, _, name = node.partition("::")
        assert (ROOT / path).is_file(), node
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name.split("[")[0] in names, f"{node}: no such test function"


# ---- running commands -------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_command(command: str, cwd: Path, stdin: str = "") -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one command line."""
    argv = shlex.split(command)
    if argv[0] == "l4jax":
        from l4jax.cli import main

        out, err = io.StringIO(), io.StringIO()
        handler = signal.getsignal(signal.SIGTERM)  # (`l4jax convert` sets its own)
        loggers = [logging.getLogger(name) for name in ("l4jax", "pipelines", "sharding")]
        logger_state = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]  # (train's)
        here = Path.cwd()
        try:
            os.chdir(cwd)
            with (
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
                pytest.MonkeyPatch.context() as mp,
            ):
                mp.setattr("sys.stdin", io.StringIO(stdin))
                try:
                    rc = main(argv[1:])
                except SystemExit as e:
                    rc = e.code
        finally:
            os.chdir(here)
            signal.signal(signal.SIGTERM, handler)
            for lg, (handlers, level, propagate) in zip(loggers, logger_state):
                lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
        return rc, out.getvalue(), err.getvalue()
    assert argv[0] in ("python", "python3"), f"no runner for {command!r}"
    result = subprocess.run(
        [sys.executable, *argv[1:]], input=stdin, capture_output=True, text=True,
        cwd=ROOT, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def run_snippet(item: Item, namespace: dict, cwd: Path) -> None:
    snippet = PYTHON[item.key]
    source = item.text
    for old, new in snippet.replace:
        assert old in source, f"{item}: replacement {old!r} not found"
        source = source.replace(old, new)
    here = Path.cwd()
    try:
        os.chdir(cwd)
        exec(compile(snippet.setup, f"<setup of {item}>", "exec"), namespace)
        exec(compile(source, f"<{item}>", "exec"), namespace)
        ok = eval(snippet.check, {"json": json, "Path": Path, **namespace})
    finally:
        os.chdir(here)
    assert ok, f"{item}: check failed: {snippet.check}"


# ---- tiny inputs under the docs' names ---------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Callable[[str], Path]:
    """Each WORKSPACE kind, built once (lazily: a kind is built when a workspace needs it)."""
    root = tmp_path_factory.mktemp("doc_inputs")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = BUILDERS[kind](root / kind)
        return built[kind]

    return get


def llama4_tokenizer() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("llama_models") / "llama4" / "tokenizer.model"))


def build_hf(path: Path) -> Path:
    import torch
    from hf_reference import SCOUT_LIKE, build_hf_model

    model = build_hf_model(dict(SCOUT_LIKE, num_hidden_layers=2, vocab_size=202048), seed=0)
    model.to(torch.bfloat16).save_pretrained(path)
    shutil.copy(llama4_tokenizer(), path / "tokenizer.model")
    return path


def build_meta(path: Path) -> Path:
    import torch
    from meta_reference import TINY_META_PARAMS, build_meta_model, save_meta_checkpoint

    model = build_meta_model(TINY_META_PARAMS, seed=0)
    return save_meta_checkpoint(model, TINY_META_PARAMS, path, 2, "fused", dtype=torch.bfloat16)


def build_mm(path: Path) -> Path:
    import torch
    import transformers
    from hf_reference import SCOUT_LIKE

    from l4jax.config import Llama4Config
    from l4jax.vision_config import Llama4MultimodalConfig, vision_preset

    text = Llama4Config.from_hf_dict(dict(SCOUT_LIKE, num_hidden_layers=2, vocab_size=202048))
    hf = Llama4MultimodalConfig(text, vision_preset("tiny")).to_hf_dict()
    for fields in (hf, hf["text_config"]):
        fields.pop("architectures", None)
        fields.pop("torch_dtype", None)
    torch.manual_seed(0)
    transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**hf)).save_pretrained(
        path
    )
    shutil.copy(llama4_tokenizer(), path / "tokenizer.model")
    return path


def build_file(write):
    def build(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        return path

    return build


def write_corpus(path: Path) -> None:
    path.mkdir()
    for doc in ("README.md", "docs/training.md", "docs/moe.md"):
        shutil.copy(ROOT / doc, path / (Path(doc).stem + ".txt"))


def write_image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 90, 3), np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_tiny_config(path: Path) -> None:
    from hf_reference import SCOUT_LIKE

    from l4jax.config import Llama4Config

    hf = dict(SCOUT_LIKE, num_hidden_layers=2, num_local_experts=8, vocab_size=512)
    Llama4Config.from_hf_dict(hf).to_json_file(path)


BUILDERS = {
    "hf": build_hf,
    "meta": build_meta,
    "mm": build_mm,
    "tiny-config": build_file(write_tiny_config),
    "corpus": build_file(write_corpus),
    "dialog": build_file(lambda p: p.write_text(json.dumps([{"role": "user", "content": "Hi"}]))),
    "image": build_file(write_image),
}


def workspace(file: str, inputs, tmp_path: Path) -> Path:
    for name, kind in WORKSPACE.get(file, {}).items():
        dst = tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if kind == "hf-config":
            shutil.copy(inputs("hf") / "config.json", dst)
        else:
            dst.symlink_to(inputs(kind), target_is_directory=inputs(kind).is_dir())
    return tmp_path


RUNNABLE = [
    f
    for f, items in ITEMS.items()
    if any(i.kind == "python" or (i.text in RUN and FIRST[i.text] == i) for i in items)
]


# the docs whose commands train, generate or convert end to end (a minute or more each): slow
SLOW_DOCS = {"docs/training.md", "docs/inference.md", "docs/vision.md", "docs/quantization.md"}


@pytest.mark.parametrize(
    "file", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_DOCS else f for f in RUNNABLE]
)
def test_doc_file_runs(file, inputs, tmp_path):
    """Follow `file` top to bottom: its RUN commands and ```python snippets, in order."""
    cwd = workspace(file, inputs, tmp_path)
    namespace: dict = {}
    for item in ITEMS[file]:
        if item.kind == "python" and item.key in PYTHON:
            run_snippet(item, namespace, cwd)
        elif item.kind == "command" and item.text in RUN and FIRST[item.text] == item:
            run = RUN[item.text]
            rc, out, err = run_command(run.cmd, cwd, run.stdin)
            what = f"{item}\nran: {run.cmd}\nexit {rc}\nstdout:\n{out[-2000:]}\n"
            what += f"stderr:\n{err[-2000:]}"
            assert rc == run.rc, what
            assert re.search(run.expect, out, re.MULTILINE), f"stdout !~ {run.expect!r}: {what}"
            assert re.search(run.expect_err, err, re.MULTILINE), (
                f"stderr !~ {run.expect_err!r}: {what}"
            )


# ---- the COVERED tests that live here ----------------------------------------------------------


# `eval` for `.ci/run` under test: prints its argument; for the Quickstart's first line it fakes
# the fresh venv (this interpreter as its python, an `l4jax` that prints text) and a demo run
# whose metrics.jsonl has losses FIRST..LAST
FAKE_EVAL = r"""
eval() {
  printf "EVAL %s\n" "$*"
  case "$*" in *"l4jax train"*)
    mkdir -p .venv/bin runs/demo
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$PYTHON" > .venv/bin/python && chmod +x .venv/bin/python
    printf '#!/bin/sh\necho generated text\n' > .venv/bin/l4jax && chmod +x .venv/bin/l4jax
    "$PYTHON" -c "import json, numpy as np
[print(json.dumps({'loss': float(x)})) for x in np.linspace($FIRST, $LAST, 150)]" \
      > runs/demo/metrics.jsonl ;;
  esac
}
export -f eval
bash "$0"
"""


def test_ci_runs_both_readme_quickstart_lines():
    """`.ci/run` evaluates the README Quickstart's two lines as written: the first in a fresh
    copy of the tree, then checks the demo's loss, generates and preprocesses an image from
    that venv; then the test line, and the slow tests it deselects. A loss that did not fall as
    the README says fails it."""
    block = (ROOT / "README.md").read_text().split("## Quickstart")[1].split("```bash\n")[1]
    main_line, test_line = block.splitlines()[:2]
    ci = str(ROOT / ".ci" / "run")  # run from another directory: it finds the README itself

    def run(first: float, last: float) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHON": sys.executable, "FIRST": str(first), "LAST": str(last)}
        return subprocess.run(
            ["bash", "-c", FAKE_EVAL, ci], capture_output=True, text=True, cwd="/", env=env
        )

    result = run(6.5, 2.1)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[:2] == [f"ci (fresh copy of the tree, no extras): {main_line}", f"EVAL {main_line}"]
    assert "ci: demo loss 6.500 -> 2.100 over 150 steps" in out
    assert "ci: l4jax generate --preset tiny: generated text" in out
    assert any(line.startswith("ci: image tiles") for line in out), out
    slow_line = test_line.split("&& ")[-1].replace('-m "not slow"', "-m slow")
    assert out[-4:] == [f"ci: {test_line}", f"EVAL {test_line}", f"ci: {slow_line}",
                        f"EVAL {slow_line}"]  # fmt: skip
    assert "pytest" in test_line and '".[test]"' in test_line and "-e ." in main_line
    assert test_line.endswith('-m "not slow"')
    failed = run(6.5, 3.5)  # the loss did not fall as the README says
    assert failed.returncode != 0 and "EVAL" not in failed.stdout.splitlines()[-1]
    assert "the README says 150 steps" in failed.stderr


def test_pip_extras_named_in_the_docs_exist():
    """`pip install -e ".[torch]"` and `pip install 'l4jax[data]'` name real extras, and the
    `test` extra that CI installs contains both."""
    cfg = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    cfg.read(ROOT / "setup.cfg")
    extras = {k: set(v.split()) for k, v in cfg["options.extras_require"].items()}
    assert {"torch", "data"} <= set(extras)
    assert extras["torch"] | extras["data"] <= extras["test"]
    assert any(r.startswith("pyarrow") for r in extras["data"])
    assert any(r.startswith("transformers") for r in extras["torch"])


def test_console_script_is_the_cli():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options.entry_points"]["console_scripts"].split() == [
        "l4jax",
        "=",
        "l4jax.cli:main",
    ]


def test_train_defaults_are_the_documented_demo():
    """`l4jax train` with no arguments: the demo preset, 150 steps of 8 x 256 tokens, checkpoints
    every 50 steps in runs/demo, a log line every 10 steps, then a sample (docs/training.md)."""
    from l4jax.cli import build_parser
    from l4jax.train_cli import train_config_from_args

    args = build_parser().parse_args(["train"])
    assert args.preset == "demo" and args.config is None and args.data is None
    tc = train_config_from_args(args)
    assert (
        tc.steps, tc.batch_size, tc.seq_len, tc.checkpoint.save_every, tc.logging.log_every
    ) == (
        150, 8, 256, 50, 10
    )  # fmt: skip
    assert Path(tc.checkpoint.directory) == Path("runs/demo") and tc.sample.tokens > 0


def test_benchmark_commands_use_existing_flags():
    """Every benchmark command in the docs names an existing script, every flag it uses is in
    that script's `--help`, and every value of a flag with choices is one of them."""
    commands = {
        item.text
        for items in ITEMS.values()
        for item in items
        if item.kind == "command" and "benchmarks/" in item.text
    }
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    helps = {}
    for script in scripts:
        rc, out, _ = run_command(f"python benchmarks/{script.name} --help", ROOT)
        assert rc == 0 and out.startswith("usage:"), f"{script.name} --help:\n{out}"
        helps[script.name] = out
    for command in sorted(commands):
        argv = shlex.split(command.replace("[", "").replace("]", ""))
        name = argv[1].removeprefix("benchmarks/")
        if name == "NAME.py":
            assert argv[2:] == ["--help"]
            continue
        assert name in helps, f"{command}: no script benchmarks/{name}"
        for i, arg in enumerate(argv[2:], 2):
            if arg.startswith("--"):
                assert re.search(rf"(^|[\s\[]){re.escape(arg)}\b", helps[name]), (
                    f"{command}: {arg} is not in {name} --help"
                )
                choices = re.search(rf"{re.escape(arg)} \{{([\w,]+)\}}", helps[name])
                if choices and i + 1 < len(argv):
                    assert argv[i + 1] in choices.group(1).split(","), command


def test_roofline_table_is_what_the_script_prints():
    rc, out, _ = run_command("python benchmarks/moe.py --part roofline", ROOT)
    assert rc == 0, out
    readme = (ROOT / "benchmarks" / "README.md").read_text().split("roofline on paper")[1]
    rows = [r for r in readme.splitlines() if r.startswith("| Scout") or r.startswith("| Maverick")]
    assert len(rows) == 16
    printed = {" ".join(r.split()) for r in out.splitlines()}
    for row in rows:
        assert " ".join(row.split()) in printed, f"not printed by moe.py --part roofline: {row}"
