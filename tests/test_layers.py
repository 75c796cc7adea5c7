"""The import graph of l4jax/, sharding/ and pipelines/: layers that depend one way, no cycles.

The graph is read from the source (`ast`), every `import` statement of every module, also the
ones inside functions (a function-local import is still a dependency); `if TYPE_CHECKING:`
imports are left out. `from pkg import name` is an edge to `pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("l4jax", "sharding", "pipelines")

# Lowest first: a module may import modules of its own layer or of layers below it, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("l4jax.errors", "l4jax.inputs")),
    ("config", ("l4jax.config", "l4jax.vision_config")),
    ("quantization", ("l4jax.quantization",)),
    ("kernels", ("l4jax.kernels", "l4jax.kernels.*")),
    (
        "model",
        (
            "l4jax.attention",
            "l4jax.losses",
            "l4jax.context_parallel",
            "l4jax.moe",
            "l4jax.expert_parallel",
            "l4jax.model",
            "l4jax.vision",
        ),
    ),
    ("tokenizer", ("l4jax.tokenizer",)),
    # convert/: names and layouts, shared streaming pieces -> readers and writers -> the one
    # format detector -> loading and conversion
    (
        "convert.base",
        (
            "l4jax.convert.mapping",
            "l4jax.convert.hostmem",
            "l4jax.convert.streaming",
            "l4jax.convert.quantized",
            "l4jax.convert.zarr_layout",
        ),
    ),
    (
        "convert.io",
        (
            "l4jax.convert.hf",
            "l4jax.convert.hf_fp8",
            "l4jax.convert.meta",
            "l4jax.convert.orbax",
            "l4jax.convert.export",
        ),
    ),
    ("convert.formats", ("l4jax.convert.formats",)),
    ("convert", ("l4jax.convert", "l4jax.convert.load", "l4jax.convert.conversion")),
    ("sharding", ("sharding", "sharding.*")),
    ("pipelines", ("pipelines", "pipelines.*")),
    ("inference", ("l4jax.kv_cache", "l4jax.sampling", "l4jax.decoding", "l4jax.preprocess")),
    ("inference.images", ("l4jax.image_prompts",)),
    ("inference.cli", ("l4jax.generate_cli",)),
    ("checkpoint", ("l4jax.checkpoint",)),
    # training: the settings and what a run trains -> post-training tasks -> the step, metrics
    # and loop -> the CLI, which picks the task
    ("train.config", ("l4jax.train_config", "l4jax.train_task")),
    ("post", ("l4jax.post", "l4jax.post.*")),
    ("train", ("l4jax.train_step", "l4jax.train_metrics", "l4jax.train")),
    ("train.cli", ("l4jax.train_cli",)),
    ("tools", ("l4jax.torch_ref", "l4jax.verify")),
    ("api", ("l4jax", "l4jax.cli", "l4jax.__main__")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """(imported module, eager) of every import statement; eager: run when the module is."""

    def __init__(self) -> None:
        self.found: list[tuple[str, list[str], bool]] = []
        self._depth = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], self._depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        assert node.level == 0, "relative import"
        self.found.append((node.module or "", [a.name for a in node.names], self._depth == 0))


def import_graph(eager_only: bool = False) -> dict[str, set[str]]:
    """module -> the modules of l4jax/sharding/pipelines it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        edges: set[str] = set()
        for module, names, eager in visitor.found:
            if eager_only and not eager:
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if len(targets) < len(names) or not names:
                targets.append(module)
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_graph_sees_the_imports():
    graph = import_graph()
    assert "l4jax.moe" in graph["l4jax.model"]
    assert "l4jax.kernels.chunked_gmm" in graph["l4jax.moe"]  # a function-local import
    assert "l4jax.kernels.chunked_gmm" not in import_graph(eager_only=True)["l4jax.moe"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    """Also none through function-local imports: those are for optional or heavy libraries
    (torch, PIL, Pallas), never to break a cycle."""
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_import_one_way():
    """Every module is in a layer and imports only its own layer and the layers below."""
    wrong = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["l4jax", "l4jax.model", "sharding"])
def test_import_loads_no_heavy_io_libraries(module):
    """`import l4jax` (and the model, sharding) leaves tensorstore, Orbax, safetensors, the
    tokenizer libraries, torch and PIL unloaded until something uses them. (`pipelines` imports
    Grain, which imports Orbax.)"""
    heavy = ("tensorstore", "orbax", "safetensors", "tokenizers", "tiktoken", "torch", "PIL")
    code = (
        f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not set(heavy) & set(out), sorted(set(heavy) & set(out))
