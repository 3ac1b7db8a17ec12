import importlib.util
import logging
import os

import pytest

# Eight fake CPU devices for the sharded tests; must be set before jax is imported.
# pytest-xdist runs one worker per core, so XLA's intra-op thread pool only contends with
# the other worker: single-threaded Eigen ran the suite about 8% faster here.
# Subprocesses inherit the flags.
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_cpu_multi_thread_eigen=false")

# One pytest process imports tensorflow (the input pipeline tests) and, later, transformers'
# torch models, which import triton where the CUDA build of torch is installed. Loading
# triton's library after tensorflow's crashes the process (`python -c "import tensorflow;
# import triton"` exits with a segmentation fault, issue #21); the other order works. So
# triton comes first here. The entry points never need both: export imports no tensorflow
# (tests/test_export_cli.py checks it in a fresh process).
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """`python -m jaxmedclip.train`'s `main` points the package logger at the stdout of its
    process; tests that call `main` must not leave it pointing at a captured stream that
    pytest has closed, or later tests' log records go nowhere."""
    logger = logging.getLogger("jaxmedclip")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate
