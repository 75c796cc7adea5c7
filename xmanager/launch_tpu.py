"""Launch `l4jax train` on a Cloud TPU pod: an XManager experiment, or the plain gcloud commands.

    # what would run, without launching anything
    python xmanager/launch_tpu.py --name scout-ft --accelerator v5p-128 --zone us-east5-a \\
        --project my-project --print-gcloud -- --preset scout --data /data/text --mesh fsdp=-1

    # the XManager experiment (needs `pip install xmanager` and its Vertex AI setup)
    python xmanager/launch_tpu.py --name scout-ft --accelerator v5p-128 ... --xm -- ...

Everything after `--` is passed to `l4jax train` on every host, with `--distributed` added
(on TPU VMs `jax.distributed.initialize()` finds the coordinator and process ids itself, and
multi-slice jobs get their DCN settings from the queued resource). The job spec is built by
plain functions (`TpuJobSpec`, `gcloud_commands`, `xm_job_spec`), so it is testable without
xmanager or gcloud; only `launch_xm` imports `xmanager`.

This directory is deliberately not a Python package (no `__init__.py`), so it never shadows
the real `xmanager` library; load this file by path.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import subprocess
import sys
from typing import Any

# generation -> (runtime version, TensorCores counted per chip in the accelerator name,
#                topology dimensions, XManager resource name)
GENERATIONS = {
    "v4": ("tpu-ubuntu2204-base", 2, 3, "tpu_v4"),
    "v5p": ("v2-alpha-tpuv5", 2, 3, "tpu_v5p"),
    "v5litepod": ("v2-alpha-tpuv5-lite", 1, 2, "tpu_v5e"),
    "v6e": ("v2-alpha-tpuv6e", 1, 2, "tpu_v6e"),
}
CHIPS_PER_HOST = 4
SINGLE_HOST_MAX_CHIPS = {"v5litepod": 8, "v6e": 8}


@dataclasses.dataclass(frozen=True)
class TpuJobSpec:
    """One training job on `num_slices` TPU slices of type `accelerator` (e.g. `v5p-128`)."""

    name: str
    accelerator: str
    zone: str
    project: str
    train_args: tuple[str, ...] = ()
    num_slices: int = 1
    runtime_version: str | None = None
    spot: bool = False
    workdir: str = "~/l4jax"
    setup: str = "pip install -q -U 'jax[tpu]' && pip install -q -e ."

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ValueError(f"name {self.name!r}: lowercase letters, digits and '-' only")
        parse_accelerator(self.accelerator)
        if self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}")
        chips = self.chips_per_slice
        if chips < 1 or chips & (chips - 1):
            raise ValueError(f"accelerator {self.accelerator!r}: {chips} chips is not a pod slice")

    @property
    def generation(self) -> str:
        return parse_accelerator(self.accelerator)[0]

    @property
    def chips_per_slice(self) -> int:
        generation, count = parse_accelerator(self.accelerator)
        return count // GENERATIONS[generation][1]

    @property
    def hosts_per_slice(self) -> int:
        chips = self.chips_per_slice
        if chips <= SINGLE_HOST_MAX_CHIPS.get(self.generation, CHIPS_PER_HOST):
            return 1
        return chips // CHIPS_PER_HOST

    @property
    def topology(self) -> str:
        return topology(self.chips_per_slice, GENERATIONS[self.generation][2])

    @property
    def runtime(self) -> str:
        return self.runtime_version or GENERATIONS[self.generation][0]

    def train_command(self) -> list[str]:
        """The command every host runs."""
        args = list(self.train_args)
        if "--distributed" not in args:
            args.append("--distributed")
        return ["python3", "-m", "l4jax", "train", *args]


def parse_accelerator(accelerator: str) -> tuple[str, int]:
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
    if not match:
        raise ValueError(f"accelerator {accelerator!r}: expected v4-N, v5p-N, v5litepod-N or v6e-N")
    return match.group(1), int(match.group(2))


def topology(chips: int, dims: int) -> str:
    """The standard slice shape for `chips` chips: 2D (v5e, v6e) or 3D (v4, v5p)."""
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips: slice sizes are powers of two")
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):  # grow the smallest dimension
        shape[shape.index(min(shape))] *= 2
    shape.sort()
    if dims == 3 and shape[0] == 1 < shape[-1]:
        shape = shape[1:] + [1]  # v4-8 is "2x2x1"
    return "x".join(str(s) for s in shape)


# ---- plain gcloud ---------------------------------------------------------------------------


def gcloud_commands(spec: TpuJobSpec) -> list[list[str]]:
    """Create the queued resource, copy the code to every host, run training on all hosts."""
    where = ["--project", spec.project, "--zone", spec.zone]
    create = [
        "gcloud", "compute", "tpus", "queued-resources", "create", spec.name, *where,
        "--accelerator-type", spec.accelerator, "--runtime-version", spec.runtime,
    ]  # fmt: skip
    if spec.num_slices == 1:
        create += ["--node-id", spec.name]
        nodes = [spec.name]
    else:
        create += ["--node-count", str(spec.num_slices), "--node-prefix", spec.name]
        nodes = [f"{spec.name}-{i}" for i in range(spec.num_slices)]
    if spec.spot:
        create.append("--spot")
    wait = [
        "gcloud", "compute", "tpus", "queued-resources", "describe", spec.name, *where,
        "--format=value(state.state)",
    ]  # fmt: skip
    copy = [
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".",
         f"{node}:{spec.workdir}", *where, "--worker=all"]
        for node in nodes
    ]  # fmt: skip
    remote = f"cd {spec.workdir} && {spec.setup} && {shlex.join(spec.train_command())}"
    run = [
        "gcloud", "compute", "tpus", "queued-resources", "ssh", spec.name, *where,
        "--worker=all", "--node=all", "--command", remote,
    ]  # fmt: skip
    return [create, wait, *copy, run]


def gcloud_script(spec: TpuJobSpec) -> str:
    create, wait, *rest = gcloud_commands(spec)
    lines = ["#!/usr/bin/env bash", "set -euo pipefail", shlex.join(create)]
    lines.append(f'until [ "$({shlex.join(wait)})" = ACTIVE ]; do sleep 30; done')
    lines += [shlex.join(c) for c in rest]
    return "\n".join(lines) + "\n"


# ---- XManager ---------------------------------------------------------------------------------


def xm_job_spec(spec: TpuJobSpec) -> dict[str, Any]:
    """Plain data for the XManager job: executable, TPU requirement, args."""
    resource = GENERATIONS[spec.generation][3]
    return {
        "experiment_title": spec.name,
        "executable": {
            "kind": "PythonContainer",
            "path": ".",
            "entrypoint": {"module": "l4jax.cli"},
            "base_image": "python:3.11",
        },
        "executor": {"kind": "Vertex", "requirements": {resource: spec.topology}},
        "num_slices": spec.num_slices,
        "args": spec.train_command()[3:],  # after `python3 -m l4jax`
    }


def launch_xm(spec: TpuJobSpec) -> None:  # pragma: no cover - needs xmanager and a GCP project
    """Create the XManager experiment (imports the real `xmanager` library)."""
    from xmanager import xm, xm_local

    job = xm_job_spec(spec)
    with xm_local.create_experiment(experiment_title=job["experiment_title"]) as experiment:
        [executable] = experiment.package(
            [
                xm.python_container(
                    executor_spec=xm_local.Vertex.Spec(),
                    path=job["executable"]["path"],
                    base_image=job["executable"]["base_image"],
                    entrypoint=xm.ModuleName(job["executable"]["entrypoint"]["module"]),
                )
            ]
        )
        requirements = xm.JobRequirements(**job["executor"]["requirements"])
        for _ in range(job["num_slices"]):
            experiment.add(
                xm.Job(
                    executable=executable,
                    executor=xm_local.Vertex(requirements=requirements),
                    args=job["args"],
                )
            )


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, TpuJobSpec]:
    if "--" in argv:
        split = argv.index("--")
        own, train_args = argv[:split], argv[split + 1 :]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--accelerator", required=True, help="v4-N, v5p-N, v5litepod-N or v6e-N")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--runtime-version")
    p.add_argument("--spot", action="store_true")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--print-gcloud", action="store_true", help="print the gcloud script")
    how.add_argument("--gcloud", action="store_true", help="run the gcloud commands")
    how.add_argument("--xm", action="store_true", help="launch with XManager")
    args = p.parse_args(own)
    spec = TpuJobSpec(
        name=args.name,
        accelerator=args.accelerator,
        zone=args.zone,
        project=args.project,
        train_args=tuple(train_args),
        num_slices=args.num_slices,
        runtime_version=args.runtime_version,
        spot=args.spot,
    )
    return args, spec


def main(argv: list[str] | None = None) -> int:
    args, spec = parse_args(sys.argv[1:] if argv is None else argv)
    if args.xm:
        launch_xm(spec)
    elif args.gcloud:
        subprocess.run(["bash", "-c", gcloud_script(spec)], check=True)
    else:
        print(gcloud_script(spec), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
