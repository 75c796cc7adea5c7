"""The TPU launch spec is built (XManager job and gcloud commands) without launching anything."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "xmanager" / "launch_tpu.py"


@pytest.fixture(scope="module")
def launch():
    spec = importlib.util.spec_from_file_location("l4jax_launch_tpu", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_directory_does_not_shadow_the_xmanager_library():
    assert not (PATH.parent / "__init__.py").exists()


def test_xm_job_spec_for_a_multislice_v5p_job(launch):
    args, spec = launch.parse_args(
        "--name scout-ft --accelerator v5p-128 --zone us-east5-a --project proj --num-slices 2 "
        "-- --preset scout --mesh data=2,fsdp=-1 --steps 1000".split()
    )
    assert (spec.chips_per_slice, spec.hosts_per_slice, spec.topology) == (64, 16, "4x4x4")
    job = launch.xm_job_spec(spec)
    assert job["executor"] == {"kind": "Vertex", "requirements": {"tpu_v5p": "4x4x4"}}
    assert job["num_slices"] == 2
    assert job["executable"]["entrypoint"] == {"module": "l4jax.cli"}
    assert job["args"] == [
        "train", "--preset", "scout", "--mesh", "data=2,fsdp=-1", "--steps", "1000",
        "--distributed",
    ]  # fmt: skip
    assert not args.xm and not args.gcloud  # printing is the default: nothing launches


def test_gcloud_commands_create_copy_and_run(launch):
    spec = launch.TpuJobSpec(
        name="demo", accelerator="v5litepod-16", zone="us-west4-a", project="proj",
        train_args=("--preset", "demo"), spot=True,
    )  # fmt: skip
    create, wait, copy, run = launch.gcloud_commands(spec)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "demo"]
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-16"
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"
    assert "--spot" in create and create[create.index("--node-id") + 1] == "demo"
    assert "describe" in wait and copy[copy.index("--recurse") + 2] == "demo:~/l4jax"
    remote = run[run.index("--command") + 1]
    assert remote.endswith("python3 -m l4jax train --preset demo --distributed")
    assert "--worker=all" in run and spec.topology == "4x4" and spec.hosts_per_slice == 4
    script = launch.gcloud_script(spec)
    assert script.startswith("#!/usr/bin/env bash") and shlex.join(run) in script


def test_single_host_slices_and_topologies(launch):
    assert launch.TpuJobSpec("a", "v4-8", "z", "p").topology == "2x2x1"
    assert launch.TpuJobSpec("a", "v4-32", "z", "p").topology == "2x2x4"
    assert launch.TpuJobSpec("a", "v6e-8", "z", "p").hosts_per_slice == 1
    assert launch.TpuJobSpec("a", "v6e-256", "z", "p").topology == "16x16"


@pytest.mark.parametrize(
    "accelerator, name", [("v3-8", "ok"), ("v5p-6", "ok"), ("v4-8", "Bad_Name")]
)
def test_bad_specs_are_refused(launch, accelerator, name):
    with pytest.raises(ValueError):
        launch.TpuJobSpec(name, accelerator, "z", "p")
