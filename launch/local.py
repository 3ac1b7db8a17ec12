"""Rehearse a pod job on one machine: N local processes x M fake CPU devices, gloo collectives.

  python launch/local.py --num_processes 2 --devices_per_process 4 -- \
      --config experiments/tiny_synthetic.py:runlocal --workdir /tmp/rehearsal

Every argument after `--` goes to `python -m jaxmedclip.train` (or `--module`). Process 0
prints to the console; each process's output is also kept in `<log_dir>/process_<i>.log`.
If one process fails, the others are stopped and the launcher exits with its code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    module: str,
    args: list[str],
    num_processes: int,
    devices_per_process: int,
    log_dir: str,
    timeout: float | None = None,
) -> int:
    """Starts the processes, waits for all of them; returns the first non-zero exit code."""
    os.makedirs(log_dir, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices_per_process}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    procs, logs = [], []
    for i in range(num_processes):
        log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
        logs.append(log)
        cmd = [
            sys.executable,
            "-m",
            module,
            *args,
            "--coordinator_address",
            address,
            "--num_processes",
            str(num_processes),
            "--process_id",
            str(i),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                code = failed[0] if failed else 124
                break
            time.sleep(0.2)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ours, theirs = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--module", default="jaxmedclip.train")
    parser.add_argument("--log_dir", default="/tmp/jaxmedclip_launch")
    parser.add_argument("--timeout", type=float, default=None, help="seconds")
    opts = parser.parse_args(ours)
    code = launch(
        opts.module,
        theirs,
        opts.num_processes,
        opts.devices_per_process,
        opts.log_dir,
        opts.timeout,
    )
    with open(os.path.join(opts.log_dir, "process_0.log")) as f:
        sys.stdout.write(f.read())
    if code:
        print(f"launch: a process exited with code {code}; logs in {opts.log_dir}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
