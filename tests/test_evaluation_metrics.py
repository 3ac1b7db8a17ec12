"""Evaluation metrics against scikit-learn, bootstrap CIs, linear probes, report outputs."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmedclip.evaluation import linear_probe, metrics, report


def _scores(n=300, prevalence=0.3, separation=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    # Rounded so that ties between positives and negatives occur.
    return y, np.round(rng.normal(size=n) + separation * y, 1)


def test_binary_targets_follow_chexpert_convention():
    targets, valid = metrics.binary_targets(np.array([1.0, 0.0, -1.0, 0.0]))
    np.testing.assert_array_equal(targets, [True, False, False, False])
    np.testing.assert_array_equal(valid, [True, True, False, True])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_statistic_equals_sklearn_auc(seed):
    y, s = _scores(seed=seed)
    mann_whitney = metrics._mann_whitney_auc(s[y], s[~y])
    assert mann_whitney == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_binary_report_matches_sklearn():
    y, s = _scores(seed=3)
    vy, vs = _scores(seed=4)
    out = metrics.binary_report(y, s, threshold_true=vy, threshold_score=vs, num_samples=200)
    assert out["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert (out["n_positive"], out["n_negative"]) == (y.sum(), (~y).sum())
    threshold = out["threshold"]
    assert out["f1"] == pytest.approx(skm.f1_score(y, s >= threshold))
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(y, s >= threshold))


def test_max_f1_threshold_is_best_over_all_thresholds():
    y, s = _scores(n=120, seed=5)
    best = metrics.max_f1_threshold(y, s)
    f1_at = {t: skm.f1_score(y, s >= t) for t in np.unique(s)}
    assert skm.f1_score(y, s >= best) == pytest.approx(max(f1_at.values()))
    assert metrics.max_f1_threshold(np.zeros(5, bool), np.arange(5.0)) is None


def test_bootstrap_ci_is_seeded_and_contains_the_estimate():
    y, s = _scores(n=200, seed=6)
    auc = skm.roc_auc_score(y, s)
    a = metrics.bootstrap_auc_ci(y, s, num_samples=1000, seed=7)
    b = metrics.bootstrap_auc_ci(y, s, num_samples=1000, seed=7)
    c = metrics.bootstrap_auc_ci(y, s, num_samples=1000, seed=8)
    assert a == b
    assert a != c
    for low, high in (a, c):
        assert 0 <= low < auc < high <= 1
        assert high - low < 0.3
    # More data, narrower interval.
    y_big, s_big = _scores(n=2000, seed=6)
    low, high = metrics.bootstrap_auc_ci(y_big, s_big, num_samples=300, seed=7)
    assert high - low < a[1] - a[0]


def test_bootstrap_ci_needs_two_of_each_class():
    assert metrics.bootstrap_auc_ci([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3]) is None
    assert metrics.bootstrap_auc_ci([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.3], num_samples=0) is None
    low, high = metrics.bootstrap_auc_ci([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.3], num_samples=50)
    assert low == high == 1.0


def test_multilabel_report_excludes_uncertain_and_single_class_findings():
    rng = np.random.default_rng(0)
    labels = rng.choice([1.0, 0.0, -1.0], size=(80, 3), p=[0.3, 0.5, 0.2])
    labels[:, 2] = 0.0  # No positive: AUC undefined.
    scores = rng.random((80, 3))
    out = metrics.multilabel_report(labels, scores, ["a", "b", "c"], num_samples=100, seed=1)
    for c, name in enumerate("ab"):
        keep = labels[:, c] != -1
        expected = skm.roc_auc_score(labels[keep, c] == 1, scores[keep, c])
        assert out["per_class"][name]["auc"] == pytest.approx(expected)
        assert out["per_class"][name]["n_excluded"] == int((~keep).sum())
    assert out["per_class"]["c"]["auc"] is None
    assert "0 positive" in out["per_class"]["c"]["reason"]
    mean = np.mean([out["per_class"][n]["auc"] for n in "ab"])
    assert out["mean_auc"] == pytest.approx(mean)
    again = metrics.multilabel_report(labels, scores, ["a", "b", "c"], num_samples=100, seed=1)
    assert again == out


def _probe_data(n, seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 2)) < 0.4).astype(np.float32)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb[:, :2] += 3.0 * labels  # Finding c is readable from dimension c.
    labels[rng.random(n) < 0.1, 1] = -1.0
    return emb, labels


def test_linear_probe_learns_readable_findings_and_handles_one_class_subsets():
    train_emb, train_labels = _probe_data(300, seed=0)
    test_emb, test_labels = _probe_data(200, seed=1)
    result = linear_probe.linear_probe(
        train_emb, train_labels, test_emb, test_labels, ["a", "b"], fractions=(0.01, 1.0), seed=0
    )
    full = result.report["fractions"]["100%"]
    assert full["n_train"] == 300 and not full["skipped"]
    assert full["auc"]["a"] > 0.95 and full["auc"]["b"] > 0.95
    keep = test_labels[:, 1] != -1
    expected = skm.roc_auc_score(test_labels[keep, 1] == 1, result.test_scores["100%"][keep, 1])
    assert full["auc"]["b"] == pytest.approx(expected)
    # 1% of 300 is 3 rows: some finding is likely a single class there; never a crash.
    small = result.report["fractions"]["1%"]
    assert small["n_train"] == 3
    for name, auc in small["auc"].items():
        assert (auc is None) == (name in small["skipped"])
    again = linear_probe.linear_probe(
        train_emb, train_labels, test_emb, test_labels, ["a", "b"], fractions=(0.01, 1.0), seed=0
    )
    assert again.report == result.report


def test_linear_probe_single_class_subset_reports_none():
    emb = np.random.default_rng(0).normal(size=(50, 4))
    labels = np.zeros((50, 1), np.float32)
    labels[0] = 1.0
    result = linear_probe.linear_probe(emb, labels, emb, labels, ["a"], fractions=(0.02,), seed=3)
    entry = result.report["fractions"]["2%"]
    assert entry["auc"] == {"a": None} and entry["mean_auc"] is None
    assert "positives" in entry["skipped"]["a"]
    assert np.isnan(result.test_scores["2%"]).all()


def test_probe_subsets_are_seeded():
    a = linear_probe.subset_rows(1000, 0.1, seed=0)
    assert a.size == 100 and np.array_equal(a, linear_probe.subset_rows(1000, 0.1, seed=0))
    assert not np.array_equal(a, linear_probe.subset_rows(1000, 0.1, seed=1))
    assert linear_probe.subset_rows(10, 0.01, seed=0).size == 1
    with pytest.raises(ValueError, match="fractions"):
        linear_probe.subset_rows(10, 1.5, seed=0)


def test_report_outputs(tmp_path):
    result = {
        "step": 3,
        "split": "test",
        "num_examples": 4,
        "zero_shot": {
            "mean_auc": 0.75,
            "mean_f1": None,
            "mean_mcc": float("nan"),
            "threshold_split": "validation",
            "confidence": 0.95,
            "auc": {
                "Pleural Effusion": {
                    "value": 0.75,
                    "ci": [0.5, 1.0],
                    "n_positive": 2,
                    "n_negative": 2,
                    "n_excluded": 0,
                },
            },
            "f1": {"Pleural Effusion": None},
            "mcc": {"Pleural Effusion": None},
        },
        "retrieval": {
            "num_queries": 4,
            "num_distinct_texts": 3,
            "image_to_text": {"recall@1": 0.5, "median_rank": 1.5, "chance": {"recall@1": 0.3}},
            "text_to_image": {"recall@1": 0.25, "median_rank": 2.0, "chance": {"recall@1": 0.3}},
        },
        "linear_probe": {
            "train_split": "train",
            "n_train_total": 10,
            "fractions": {
                "10%": {"n_train": 1, "mean_auc": None, "auc": {}, "skipped": {"a": "x"}}
            },
        },
    }
    flat = report.flat_metrics(result)
    assert flat == {
        "eval/zero_shot_mean_auc": 0.75,
        "eval/zero_shot_auc/pleural_effusion": 0.75,
        "eval/i2t_recall@1": 0.5,
        "eval/i2t_median_rank": 1.5,
        "eval/t2i_recall@1": 0.25,
        "eval/t2i_median_rank": 2.0,
    }
    path = tmp_path / "eval" / "report.json"
    report.write_json(str(path), result)
    loaded = json.loads(path.read_text())
    assert loaded["zero_shot"]["mean_mcc"] is None  # NaN is not JSON.
    table = report.summary_table(result)
    assert "Pleural Effusion" in table and "[0.500, 1.000]" in table and "0.500 (0.300)" in table

    png = tmp_path / "roc.png"
    y = np.array([0, 1, 0, 1, 1], bool)
    assert report.write_roc_curves(str(png), "t", {"a": (y, np.arange(5.0)), "b": (y[:1], [0])})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.write_roc_curves(str(tmp_path / "none.png"), "t", {"b": (y[:1], [0])})
