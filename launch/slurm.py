"""Write a SLURM batch script that trains on several GPU nodes.

  python -m launch.slurm --nodes 4 --gpus_per_node 8 [--partition gpu] [--time 24:00:00] \
      [--tasks_per gpu|node] [--setup 'source .venv/bin/activate'] [--output run.sbatch] -- \
      --config experiments/vit_b16_mimic.py --workdir /shared/runs/b16
  sbatch run.sbatch

The script runs `srun python -m jaxmedclip.train <args> --multihost`. With `--multihost`
the trainer calls `jax.distributed.initialize()` with no arguments, and jax's SLURM
detection (jax/_src/clusters/slurm_cluster.py) fills in everything from srun's
environment: the coordinator is the first host of SLURM_STEP_NODELIST (port derived from
SLURM_JOB_ID, or JAX_COORDINATOR_PORT), num_processes = SLURM_NTASKS, process_id =
SLURM_PROCID, and the process's GPUs are [SLURM_LOCALID].

- `--tasks_per gpu` (default): one process per GPU (ntasks-per-node = GPUs per node); each
  process uses the GPU whose index is its SLURM_LOCALID.
- `--tasks_per node`: one process per node owning all its GPUs; the script sets
  JAX_LOCAL_DEVICE_IDS=0,...,G-1, which jax reads before its SLURM detection.

SLURM sends SIGTERM to the tasks `--signal_seconds` before the time limit: the trainer
saves a checkpoint and exits; submitting the same script again (or `--requeue`) resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

MODULE = "jaxmedclip.train"


def srun_line(train_args: Sequence[str], *, python: str = "python3", module: str = MODULE) -> str:
    args = list(train_args)
    if "--multihost" not in args:
        args.append("--multihost")
    return shlex.join(["srun", "--kill-on-bad-exit=1", python, "-m", module, *args])


def batch_script(
    train_args: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    tasks_per: str = "gpu",
    job_name: str = "jaxmedclip",
    partition: str | None = None,
    account: str | None = None,
    time_limit: str = "24:00:00",
    cpus_per_task: int | None = None,
    repo_dir: str = "$SLURM_SUBMIT_DIR",
    setup: Sequence[str] = (),
    signal_seconds: int = 300,
    requeue: bool = False,
    python: str = "python3",
) -> str:
    """The text of the sbatch script (see the module docstring)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes {nodes} and --gpus_per_node {gpus_per_node} must be >= 1")
    if tasks_per not in ("gpu", "node"):
        raise ValueError(f"--tasks_per {tasks_per!r} must be 'gpu' or 'node'")
    tasks_per_node = gpus_per_node if tasks_per == "gpu" else 1
    directives = {
        "job-name": job_name,
        "nodes": nodes,
        "ntasks-per-node": tasks_per_node,
        "gpus-per-node": gpus_per_node,
        "time": time_limit,
        "output": "%x-%j.out",
        "signal": f"TERM@{signal_seconds}",
        "partition": partition,
        "account": account,
        "cpus-per-task": cpus_per_task,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    if requeue:
        lines.append("#SBATCH --requeue")
    lines += [
        "",
        f"# {nodes} node(s) x {gpus_per_node} GPU(s), one process per {tasks_per}: "
        f"{nodes * tasks_per_node} processes.",
        "# jax.distributed.initialize() (--multihost) reads the cluster from SLURM's variables.",
        "set -euo pipefail",
        f'cd "{repo_dir}"',
        *setup,
        "export PYTHONUNBUFFERED=1",
    ]
    if tasks_per == "node":
        ids = ",".join(str(i) for i in range(gpus_per_node))
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={ids}  # Every GPU of the node.")
    lines.append(srun_line(train_args, python=python))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ours, theirs = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--tasks_per", choices=("gpu", "node"), default="gpu")
    parser.add_argument("--job_name", default="jaxmedclip")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS")
    parser.add_argument("--cpus_per_task", type=int)
    parser.add_argument("--repo_dir", default="$SLURM_SUBMIT_DIR")
    parser.add_argument(
        "--setup", action="append", default=[], help="shell line run before srun (repeatable)"
    )
    parser.add_argument("--signal_seconds", type=int, default=300)
    parser.add_argument("--requeue", action="store_true")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--output", help="write the script here (default: print it)")
    opts = parser.parse_args(ours)
    if not theirs:
        parser.error("give the trainer's arguments after `--` (at least --config and --workdir)")
    try:
        script = batch_script(
            theirs,
            nodes=opts.nodes,
            gpus_per_node=opts.gpus_per_node,
            tasks_per=opts.tasks_per,
            job_name=opts.job_name,
            partition=opts.partition,
            account=opts.account,
            time_limit=opts.time,
            cpus_per_task=opts.cpus_per_task,
            repo_dir=opts.repo_dir,
            setup=opts.setup,
            signal_seconds=opts.signal_seconds,
            requeue=opts.requeue,
            python=opts.python,
        )
    except ValueError as e:
        parser.error(str(e))
    if opts.output:
        with open(opts.output, "w") as f:
            f.write(script)
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
