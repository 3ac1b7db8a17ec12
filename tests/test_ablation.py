"""benchmarks/ablation.py: its configs, the numbers it reads from a report, its table."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = importlib.util.spec_from_file_location(
    "ablation", os.path.join(REPO, "benchmarks", "ablation.py")
)
ablation = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ablation)

pytestmark = pytest.mark.slow


def fake_report(zero_shot: float, recall: float, probe: float) -> dict:
    return {
        "zero_shot": {"mean_auc": zero_shot},
        "retrieval": {"image_to_text": {"recall@10": recall, "chance": {"recall@10": 0.2}}},
        "linear_probe": {"fractions": {"1%": {"mean_auc": probe}}},
    }


def test_run_config_sets_seed_steps_and_a_test_only_evaluation():
    config = ablation.run_config("gloria", seed=2, steps=300, bootstrap_samples=50)
    assert config.seed == 2
    assert config.total_steps == 300
    assert config.eval.every_steps == 0
    assert config.eval.split == "test"
    assert config.eval.bootstrap_samples == 50
    assert tuple(config.eval.probe_fractions) == (0.01,)
    assert config.loss.local.weight == 1.0  # The method's own switch is kept.
    assert ablation.run_config("medclip", 0, 300, 50).loss.targets == "soft_labels"


def test_headline_reads_the_report():
    values = ablation.headline(fake_report(0.7, 0.3, 0.6))
    assert values == {
        "zero_shot_mean_auc": 0.7,
        "i2t_recall@10": 0.3,
        "i2t_recall@10_chance": 0.2,
        "probe_mean_auc@1%": 0.6,
    }


def test_mean_sd():
    assert ablation.mean_sd([0.5, 0.7]) == "0.600 ± 0.141"
    assert ablation.mean_sd([0.5, None]) == "0.500"
    assert ablation.mean_sd([None]) == "-"


def test_table_has_mean_and_sd_per_method_and_replaces_only_its_section(tmp_path):
    args = ablation.parse_flags(["--methods", "clip,gloria", "--seeds", "0,1", "--steps", "50"])
    runs = []
    for method, base in (("clip", 0.6), ("gloria", 0.7)):
        for seed in (0, 1):
            runs.append(
                dict(
                    method=method,
                    seed=seed,
                    train_wall_s=100.0 + seed,
                    eval_wall_s=20.0,
                    resumed_from_step=0,
                    final_loss=3.0,
                    **ablation.headline(fake_report(base + 0.1 * seed, 0.3, 0.55)),
                )
            )
    table = ablation.markdown(runs, args, "python benchmarks/ablation.py ...")
    assert "| clip | 0.650 ± 0.071 | 0.300 ± 0.000 | 0.550 ± 0.000 | 2 | 50 | 100 ± 1 |" in table
    assert "| gloria | 0.750 ± 0.071 |" in table

    path = tmp_path / "ablation.md"
    path.write_text("# Ablation\n\nintro\n")
    ablation.write_table(str(path), "PREVIOUS TABLE")
    ablation.write_table(str(path), table)
    text = path.read_text()
    assert text.startswith("# Ablation\n\nintro\n")
    assert "PREVIOUS TABLE" not in text and text.count("| clip | 0.650") == 1


def test_unknown_method_is_an_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        ablation.parse_flags(["--methods", "clip,siglip"])
    assert "clip, medclip, gloria" in capsys.readouterr().err
