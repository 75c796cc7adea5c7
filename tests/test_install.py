"""The core install: `import l4jax` and `l4jax --help` load no PIL, torch or matplotlib; without
Pillow the CLI still trains and says what images need; progress bars only on a terminal.
(`.ci/run` runs the README's first Quickstart line in a fresh venv without extras.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a child in which PIL cannot be imported, as in a venv without Pillow
NO_PIL = "import sys; sys.modules['PIL'] = None; "


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_import_and_help_stay_light():
    code = (
        NO_PIL + "import l4jax; from l4jax.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "for sub in ('train', 'generate', 'chat', 'convert'):\n"
        "    try:\n        main([sub, '--help'])\n    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'l4jax.preprocess') "
        "if m in sys.modules]\nassert not heavy, heavy\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "--pixel-dtype" in result.stdout and "--allow-unexpected" in result.stdout


def test_images_without_pillow_fail_in_one_line(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    code = NO_PIL + "from l4jax.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["generate", "--preset", "tiny", "--prompt", "hi", "--image", str(image)]
    result = run_python(code, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "l4jax generate: error: images need Pillow, which is not installed: pip install pillow"
    )


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path):
    """tqdm's `loading: 0%|` lines used to land in logs and in every captured stderr."""
    code = (
        "import l4jax, numpy as np\n"
        "from l4jax.convert.conversion import convert_checkpoint\n"
        "from l4jax.convert.export import export_hf\n"
        "from l4jax.convert.mapping import param_shapes, set_path\n"
        "config, params = l4jax.preset('tiny'), {}\n"
        "for path, shape in param_shapes(config).items():\n"
        "    set_path(params, path, np.ones(shape, np.float32))\n"
        "export_hf(params, config, sys.argv[1] + '/hf')\n"
        "l4jax.from_pretrained(sys.argv[1] + '/hf')\n"
        "convert_checkpoint(sys.argv[1] + '/hf', sys.argv[1] + '/l4jax')\n"
    )
    result = run_python("import sys\n" + code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr and "\r" not in result.stderr, result.stderr
