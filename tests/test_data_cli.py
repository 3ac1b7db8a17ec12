"""The data command-line tools end on a data error with one `error: ...` line, no traceback."""

import glob
import os

import pytest
from fixtures_medical import gradient, write_csv, write_raster

from input_pipeline import build, cli_errors, train_tokenizer

EXPERIMENT = """import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(
        name="csv_manifest", data_dir="", manual_dir="", source_max_size=16,
        build_workers=1))
    return config
"""


def flags(tmp_path):
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENT)
    return ["--config", str(experiment), f"--config.data.manual_dir={tmp_path / 'raw'}",
            f"--config.data.data_dir={tmp_path / 'tfds'}"]


def error_of(main, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message
    return message


def test_too_many_bad_rows_end_both_clis_with_the_build_report_path(tmp_path, capsys):
    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    rows = [["x.png", "Clear.", "s0", "p0", "PA", "train"]]
    rows += [[f"gone{i}.png", "Clear.", f"s{i}", f"p{i}", "PA", "train"] for i in range(1, 5)]
    manifest = write_csv(root / "manifest.csv",
                         ["image", "report", "study_id", "patient_id", "view", "split"], rows)
    for main in (build.main, train_tokenizer.main):
        message = error_of(main, flags(tmp_path))
        (report,) = glob.glob(str(tmp_path / "tfds" / "csv_manifest" / "*" /
                                  "*.build_report.json"))
        assert message.startswith("error: csv_manifest train: 4 of 5 rows are bad (80.0% > "
                                  "data.build_max_bad_fraction=1.0%)")
        assert (f"e.g. missing_image at {manifest} line 3: image not found; tried "
                f"{root / 'gone1.png'}.") in message
        assert f"listed in {report};" in message
        assert os.path.isfile(report)
        assert "Traceback" not in "".join(capsys.readouterr())


def test_train_ends_on_a_data_error_with_one_line(tmp_path, capsys):
    """`python -m jaxmedclip.train` prepares the data too (as `evaluate` does, through the
    same `training.prepare_data`): the same one line."""
    from jaxmedclip import train

    root = tmp_path / "raw"
    write_raster(root / "x.png", gradient(6, 6))
    rows = [["x.png", "Clear.", "s0", "p0", "PA", "train"]]
    rows += [[f"gone{i}.png", "Clear.", f"s{i}", f"p{i}", "PA", "train"] for i in range(1, 5)]
    write_csv(root / "manifest.csv",
              ["image", "report", "study_id", "patient_id", "view", "split"], rows)
    experiment = os.path.join(os.path.dirname(__file__), "..", "experiments",
                              "tiny_synthetic.py")
    argv = ["--config", experiment, "--workdir", str(tmp_path / "run"),
            "--config.data.name=csv_manifest", f"--config.data.manual_dir={root}",
            f"--config.data.data_dir={tmp_path / 'tfds'}"]
    message = error_of(train.main, argv)
    assert message.startswith("error: csv_manifest train: 4 of 5 rows are bad"), message
    assert ".build_report.json" in message
    assert "Traceback" not in "".join(capsys.readouterr())


def test_a_malformed_manifest_names_the_file_and_line(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    (root / "manifest.csv").write_text('image,report,study_id\nx.png,"Clear.,s1\n')
    message = error_of(build.main, flags(tmp_path))
    assert message.startswith(f"error: {root / 'manifest.csv'} line 2: not valid CSV")


@pytest.mark.parametrize("error, line", [
    (KeyError("data.nope"), "error: data.nope"),
    (ValueError("first\n\tsecond"), "error: first second"),
    (FileNotFoundError(2, "No such file or directory", "/x/y.csv"),
     "error: [Errno 2] No such file or directory: '/x/y.csv'"),
])
def test_error_line(error, line):
    assert cli_errors.error_line(error) == line
    assert isinstance(error, cli_errors.user_errors())


def test_a_bug_keeps_its_traceback():
    with pytest.raises(TypeError):
        with cli_errors.exit_on_user_error():
            raise TypeError("a bug")
