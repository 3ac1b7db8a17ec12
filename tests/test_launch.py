"""The local launcher: a 2-process x 4-device JAX cluster (gloo) trains and checkpoints."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
import local  # noqa: E402


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
    workdir, logs = tmp_path / "w", tmp_path / "logs"
    code = local.launch(
        "jaxmedclip.train",
        [
            "--config",
            "experiments/tiny_synthetic.py:runlocal",
            "--workdir",
            str(workdir),
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.data.synthetic.num_train=64",
            "--config.total_steps=6",
            "--config.log_every=3",
        ],
        num_processes=2,
        devices_per_process=4,
        log_dir=str(logs),
        timeout=600,
    )
    assert code == 0, (logs / "process_0.log").read_text()[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 3, 6]  # Written once, by process 0.
    assert "mesh {'data': 8" in (logs / "process_0.log").read_text()
    assert os.listdir(workdir / "checkpoints") == ["6"]


def test_a_failing_process_fails_the_launch(tmp_path):
    code = local.launch(
        "jaxmedclip.train",
        ["--config", "experiments/does_not_exist.py", "--workdir", str(tmp_path / "w")],
        num_processes=2,
        devices_per_process=1,
        log_dir=str(tmp_path / "logs"),
        timeout=120,
    )
    assert code != 0
    assert "does_not_exist.py" in (tmp_path / "logs" / "process_0.log").read_text()
