import importlib.util
import logging
import os
import time

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


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the session: its workers, and the entry
    points the tests start as subprocesses, compile the same tiny programs many times
    over (train steps, embedders); the second compile of a program is read from disk.
    Per session (in pytest's temporary folder), so every run starts cold, as CI does."""
    import jax

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = str(root / "xla_cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache  # For subprocesses.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    yield


def _reset_package_logger() -> None:
    logger = logging.getLogger("jaxmedclip")
    logger.handlers[:] = []
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """`python -m jaxmedclip.train`'s `main` (and the other entry points') point the package
    logger at the stdout of its process and stop its propagation; every test starts and
    ends with the logger as Python leaves it (no handler, propagating to the root, where
    pytest's caplog listens), also after a module or session fixture that called a
    `main` (those run before this fixture)."""
    _reset_package_logger()
    yield
    _reset_package_logger()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(experiment file, workdir) of a 2-step training run of a tiny synthetic config
    (`test_evaluate_entry._experiment_file`), evaluated on validation at step 2 by the
    training loop (so `<workdir>/eval/2/validation/report.json` holds validation-chosen
    thresholds). Shared by the tests of what users do with a trained model (predict,
    grounding, report drafting): read-only, copy it to write beside the checkpoint.

    Trained once per test session: under pytest-xdist the first worker that needs it
    trains into the session's shared temporary folder while the others wait for it."""
    pytest.importorskip("input_pipeline.pipeline")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "tiny_run"  # Shared by the workers.
    else:
        root = tmp_path_factory.mktemp("tiny_run")
    root.mkdir(exist_ok=True)
    experiment, workdir = str(root / "tiny_eval.py"), str(root / "work")
    done, failed = root / "done", root / "failed"
    try:
        os.close(os.open(root / "lock", os.O_CREAT | os.O_EXCL))
    except FileExistsError:  # Another worker trains it.
        deadline = time.monotonic() + 600
        while not (done.exists() or failed.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not done.exists():
            pytest.fail(f"the shared tiny run in {root} was not trained by another worker")
        return experiment, workdir
    from test_evaluate_entry import _experiment_file

    from jaxmedclip import train

    try:
        assert _experiment_file(root) == experiment
        train.main(["--config", experiment, "--workdir", workdir,
                    "--config.eval.every_steps=2"])
    except BaseException:
        failed.touch()
        raise
    done.touch()
    return experiment, workdir
