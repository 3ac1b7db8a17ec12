"""benchmarks/batch_scaling.py --quick: the study's whole path (train through the CLI,
streamed for the larger batch, evaluate, table and plot) on a tiny dataset."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_scaling_study_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "scaling.md"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "batch_scaling.py"), "--quick",
         "--workdir", str(tmp_path / "runs"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "| 16 | 16 |" in text and "| 64 | 4 |" in text
    assert "streamed, micro-batch 16" in text  # The larger batch went through streaming.
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    for batch, steps in ((16, 16), (64, 4)):
        with open(tmp_path / "runs" / f"batch{batch}" / "scaling_run.json") as f:
            run = json.load(f)
        assert run["steps"] == steps and 0 <= run["zero_shot_mean_auc"] <= 1
        assert run["final_loss"] > 0 and run["samples_per_s"] > 0
