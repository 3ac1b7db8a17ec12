"""One pool of worker processes for the builders: a function over many items, in order.

Plain subprocesses (`python -c`) that import only the function's module (numpy, Pillow,
pydicom): a multiprocessing pool would either re-import the caller's __main__ (spawn: an
unguarded script never finishes) or fork a process that runs TensorFlow and JAX threads
(fork). Worker k gets chunks k, k + workers, ... of the items at once (pickled on its
stdin) and writes one pickled list of results per chunk to its stdout; the results are
read back round-robin, so they come out in the items' order.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO


def map_in_processes(function: str, items: Sequence, workers: int, chunk: int = 1
                     ) -> Iterator[Any]:
    """`function(item)` for every item, in order, computed by up to `workers` processes
    (1: in this process). `function` is "module:name", importable without TensorFlow;
    `chunk` items go to a worker at a time."""
    chunks = [list(items[i:i + chunk]) for i in range(0, len(items), chunk)]
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        yield from map(_resolve(function), items)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}
    code = f"from input_pipeline import worker_pool; worker_pool.serve({function!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env) for _ in range(workers)]
    try:
        for k, proc in enumerate(procs):
            pickle.dump(chunks[k::workers], proc.stdin)
            proc.stdin.close()
        for i in range(len(chunks)):
            proc = procs[i % workers]
            try:
                yield from pickle.load(proc.stdout)
            except EOFError:
                raise RuntimeError(f"a worker process running {function} exited with code "
                                   f"{proc.wait()}; its error is printed above") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def serve(function: str, source: BinaryIO | None = None, sink: BinaryIO | None = None
          ) -> None:
    """Worker side: reads one pickled list of chunks from `source` (stdin) and writes
    `[function(item) for item in chunk]`, pickled, per chunk, in order, to `sink` (stdout)."""
    source = source or sys.stdin.buffer
    sink = sink or sys.stdout.buffer
    fn = _resolve(function)
    for chunk in pickle.load(source):
        pickle.dump([fn(item) for item in chunk], sink, protocol=pickle.HIGHEST_PROTOCOL)
        sink.flush()


def _resolve(function: str) -> Callable:
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)
