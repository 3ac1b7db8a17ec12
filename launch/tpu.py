"""Run the trainer on every worker of a Cloud TPU pod slice.

  python -m launch.tpu --tpu NAME --zone ZONE [--project P] [--run] -- \
      --config experiments/vit_b16_mimic.py --workdir /mnt/shared/run1

Prints (default) or runs (`--run`) one

  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "..."

whose command, on every worker, changes to the repository, sets the environment and starts
`python -m jaxmedclip.train <args> --multihost`. With `--multihost` each process calls
`jax.distributed.initialize()`, which finds the slice's workers, its own index and the
coordinator from the TPU VM metadata; nothing else is needed. The repository, its
environment and the data must already be on every worker (e.g. the same `git clone` and
`pip install -e .` run with `--worker=all`), and `--workdir` must be storage that all
workers share (checkpoints are written by every process).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

MODULE = "jaxmedclip.train"


def remote_command(
    train_args: Sequence[str],
    *,
    repo_dir: str = "~/jaxmedclip",
    env: Sequence[str] = (),
    python: str = "python3",
    module: str = MODULE,
) -> str:
    """The shell command each worker runs (cd, environment, the trainer with --multihost)."""
    args = list(train_args)
    if "--multihost" not in args:
        args.append("--multihost")
    for item in env:
        name, sep, _ = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--env {item!r} is not of the form NAME=VALUE")
    # `~` must stay unquoted to expand on the worker.
    cd = repo_dir if repo_dir.startswith("~") and " " not in repo_dir else shlex.quote(repo_dir)
    exports = [f"{k}={shlex.quote(v)}" for k, _, v in (e.partition("=") for e in env)]
    command = shlex.join([python, "-m", module, *args])
    return f"cd {cd} && " + " ".join([*exports, command])


def gcloud_command(
    tpu: str, zone: str, project: str | None, command: str, *, worker: str = "all"
) -> list[str]:
    """The `gcloud compute tpus tpu-vm ssh` argument list that runs `command` on `worker`."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, "--zone", zone]
    if project:
        argv += ["--project", project]
    return argv + [f"--worker={worker}", "--command", command]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ours, theirs = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--repo_dir", default="~/jaxmedclip", help="the repository on the workers")
    parser.add_argument(
        "--env",
        action="append",
        default=["PYTHONUNBUFFERED=1"],
        metavar="NAME=VALUE",
        help="environment for the trainer (repeatable; PYTHONUNBUFFERED=1 is always set)",
    )
    parser.add_argument("--python", default="python3", help="interpreter on the workers")
    parser.add_argument("--worker", default="all", help="'all' or a worker index")
    parser.add_argument("--run", action="store_true", help="run the command instead of printing")
    opts = parser.parse_args(ours)
    if not theirs:
        parser.error("give the trainer's arguments after `--` (at least --config and --workdir)")
    try:
        command = remote_command(theirs, repo_dir=opts.repo_dir, env=opts.env, python=opts.python)
    except ValueError as e:
        parser.error(str(e))
    argv = gcloud_command(opts.tpu, opts.zone, opts.project, command, worker=opts.worker)
    if not opts.run:
        print(shlex.join(argv))
        return 0
    return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main())
