"""torch and transformers for the PyTorch parity tests: CI installs the [torch] extra
(.ci/run), so there a missing one fails the tests instead of skipping them."""

import importlib
import os

import pytest


def import_torch_and_transformers():
    """(torch, transformers), or a skip of the calling module outside CI when absent."""
    if os.environ.get("CI"):
        return importlib.import_module("torch"), importlib.import_module("transformers")
    return pytest.importorskip("torch"), pytest.importorskip("transformers")
