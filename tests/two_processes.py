"""Runs a test worker script as 2 JAX processes x 4 CPU devices (gloo on localhost)."""

import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(worker: str, out_file, timeout: float = 300) -> None:
    """`python worker PROCESS_ID PORT OUT_FILE` for processes 0 and 1; fails the test
    with both logs when either fails (skips where jaxlib has no gloo collectives)."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # The worker sets its own device count.
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(out_file)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if any(p.returncode for p in procs):
        log = "\n".join(logs)
        if "gloo" in log.lower() and ("not available" in log or "unsupported" in log.lower()):
            pytest.skip(f"jaxlib here has no gloo CPU collectives:\n{log[-2000:]}")
        pytest.fail(f"worker failed (exit codes {[p.returncode for p in procs]}):\n"
                    f"{log[-4000:]}")
