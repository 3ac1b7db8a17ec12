"""Launchers: the local multi-process one (a 2-process x 4-device gloo cluster trains and
checkpoints, and trains like 1 process x 8 devices), the TPU pod-slice command and the
SLURM batch script."""

import json
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from launch import local, slurm, tpu  # noqa: E402


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


def test_tpu_launcher_prints_the_gcloud_command(capsys):
    code = tpu.main(
        [
            "--tpu",
            "clip-v4-64",
            "--zone",
            "us-central2-b",
            "--project",
            "my-proj",
            "--env",
            "TF_CPP_MIN_LOG_LEVEL=2",
            "--",
            "--config",
            "experiments/vit_b16_mimic.py",
            "--workdir",
            "/mnt/shared/run 1",
            "--config.total_steps=100",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip()
    argv = shlex.split(printed)
    assert argv[:11] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "clip-v4-64",
        "--zone", "us-central2-b", "--project", "my-proj", "--worker=all",
    ]  # fmt: skip
    assert argv[11] == "--command" and len(argv) == 13
    assert argv[12] == (
        "cd ~/jaxmedclip && PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 python3 -m "
        "jaxmedclip.train --config experiments/vit_b16_mimic.py --workdir '/mnt/shared/run 1' "
        "--config.total_steps=100 --multihost"
    )
    # What each worker's shell does with it: the trainer gets exactly the arguments given.
    script = argv[12].split(" && ", 1)[1]
    assert shlex.split(script)[5:] == [
        "--config", "experiments/vit_b16_mimic.py", "--workdir", "/mnt/shared/run 1",
        "--config.total_steps=100", "--multihost",
    ]  # fmt: skip


def test_tpu_launcher_needs_trainer_arguments():
    with pytest.raises(SystemExit):
        tpu.main(["--tpu", "t", "--zone", "z"])


@pytest.mark.parametrize(
    "tasks_per, ntasks, device_ids", [("gpu", 8, None), ("node", 1, "0,1,2,3")]
)
def test_slurm_script_is_valid_bash_with_the_expected_srun_line(
    tmp_path, tasks_per, ntasks, device_ids
):
    gpus = 8 if tasks_per == "gpu" else 4
    path = tmp_path / "run.sbatch"
    code = slurm.main(
        [
            "--nodes", "4", "--gpus_per_node", str(gpus), "--tasks_per", tasks_per,
            "--partition", "a100", "--setup", "source .venv/bin/activate",
            "--output", str(path), "--",
            "--config", "experiments/vit_b16_mimic.py", "--workdir", "/shared/b16",
        ]
    )  # fmt: skip
    assert code == 0
    script = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --nodes=4" in lines
    assert f"#SBATCH --ntasks-per-node={ntasks}" in lines
    assert f"#SBATCH --gpus-per-node={gpus}" in lines
    assert "#SBATCH --partition=a100" in lines
    assert "#SBATCH --signal=TERM@300" in lines
    assert lines[-1] == (
        "srun --kill-on-bad-exit=1 python3 -m jaxmedclip.train "
        "--config experiments/vit_b16_mimic.py --workdir /shared/b16 --multihost"
    )
    exports = [line for line in lines if line.startswith("export JAX_LOCAL_DEVICE_IDS")]
    if device_ids is None:
        assert not exports
    else:
        assert exports == [f"export JAX_LOCAL_DEVICE_IDS={device_ids}  # Every GPU of the node."]
    assert lines.index("source .venv/bin/activate") < len(lines) - 1


def _final_params(workdir, config):
    from jaxmedclip import checkpointing, training

    setup = training.build(config)
    manager = checkpointing.make_manager(str(workdir))
    state, step = checkpointing.restore(manager, setup.abstract_state, setup.shardings)
    manager.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices: same losses (rtol 1e-5) and final
    parameters (atol 1e-5), the same global batches and the same (data=8) mesh."""
    from jaxmedclip import config_lib

    overrides = [
        f"--config.data.data_dir={tmp_path / 'data'}",
        "--config.data.synthetic.num_train=64",
        "--config.total_steps=6",
        "--config.log_every=1",
    ]
    runs = {}
    for processes, devices in ((1, 8), (2, 4)):
        workdir, logs = tmp_path / f"{processes}x{devices}", tmp_path / f"logs{processes}"
        code = local.launch(
            "jaxmedclip.train",
            ["--config", "experiments/tiny_synthetic.py:runlocal", "--workdir", str(workdir),
             *overrides],
            num_processes=processes,
            devices_per_process=devices,
            log_dir=str(logs),
            timeout=900,
        )  # fmt: skip
        assert code == 0, (logs / "process_0.log").read_text()[-3000:]
        with open(workdir / "metrics.jsonl") as f:
            runs[processes] = {"losses": [json.loads(line)["loss"] for line in f]}
    config = config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal", [o[len("--config.") :] for o in overrides]
    )
    for processes in runs:
        runs[processes]["params"] = _final_params(
            tmp_path / f"{processes}x{8 // processes}", config
        )
    np.testing.assert_allclose(runs[2]["losses"], runs[1]["losses"], rtol=1e-5)
    assert runs[1]["params"][0] == runs[2]["params"][0] == 6
    for a, b in zip(runs[1]["params"][1], runs[2]["params"][1], strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
