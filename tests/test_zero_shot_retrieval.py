"""Zero-shot scoring, multi-class prompts and retrieval on hand-built embeddings; prompts."""

import math

import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmedclip.evaluation import prompts, retrieval, zero_shot


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_ensemble_embedding_is_normalised_mean():
    emb = _unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(zero_shot.ensemble_embedding(emb), _unit([1.0, 1.0, 0.0]), 1e-6)
    with pytest.raises(ValueError, match="zero"):
        zero_shot.ensemble_embedding(np.array([[1.0, 0.0], [-1.0, 0.0]]))


def test_binary_probabilities_known_answers():
    # Finding c is "present" along axis c, "absent" along axis c + 2 (D = 4).
    eye = np.eye(4)
    positive, negative = eye[:2], eye[2:]
    images = _unit(
        [
            [1.0, 0.0, 0.0, 1.0],  # finding 0 present, finding 1 absent
            [0.0, 1.0, 1.0, 0.0],  # finding 0 absent, finding 1 present
            [1.0, 1.0, 0.0, 0.0],  # both present
        ]
    )
    probs = zero_shot.binary_probabilities(images, positive, negative, scale=10.0)
    np.testing.assert_array_equal(probs > 0.5, [[True, False], [False, True], [True, True]])
    # The softmax over the pair of scaled similarities, written out.
    pos, neg = images @ positive.T, images @ negative.T
    expected = np.exp(10 * pos) / (np.exp(10 * pos) + np.exp(10 * neg))
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    labels = np.array([[1, 0], [0, 1], [1, 1]])
    assert skm.roc_auc_score(labels[:, 0], probs[:, 0]) == 1.0


def test_select_multiclass_keeps_rows_with_exactly_one_class():
    labels = np.array(
        [
            [1, 0, 0],
            [0, 1, 0],
            [1, 1, 0],  # two classes: out
            [0, 0, 0],  # none: out
            [0, 0, 1],
            [1, -1, 0],  # uncertain: out
            [1, 0, 0],
            [1, 0, 0],
        ],
        np.float32,
    )
    indices, targets = zero_shot.select_multiclass(labels, per_class=0)
    np.testing.assert_array_equal(indices, [0, 1, 4, 6, 7])
    np.testing.assert_array_equal(targets, [0, 1, 2, 0, 0])
    capped, capped_targets = zero_shot.select_multiclass(labels, per_class=2, seed=0)
    assert np.bincount(capped_targets).tolist() == [2, 1, 1]
    again, _ = zero_shot.select_multiclass(labels, per_class=2, seed=0)
    np.testing.assert_array_equal(capped, again)


def test_multiclass_report_accuracy_and_confusion():
    class_emb = np.eye(3, 4)
    labels = np.zeros((5, 3), np.float32)
    labels[[0, 1], 0] = labels[[2, 3], 1] = labels[4, 2] = 1
    images = _unit(
        [
            [1.0, 0.1, 0.0, 0.2],
            [0.2, 1.0, 0.0, 0.0],  # class 0 mistaken for class 1
            [0.0, 1.0, 0.1, 0.0],
            [0.0, 0.9, 0.3, 0.5],
            [0.1, 0.0, 1.0, 0.0],
        ]
    )
    out = zero_shot.multiclass_report(images, class_emb, labels, ["a", "b", "c"])
    assert out["accuracy"] == pytest.approx(0.8)
    assert out["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert out["n_per_class"] == {"a": 2, "b": 2, "c": 1} and out["chance"] == pytest.approx(1 / 3)
    empty = zero_shot.multiclass_report(images, class_emb, np.zeros((5, 3)), ["a", "b", "c"])
    assert empty["accuracy"] is None and "reason" in empty


def _brute_force_ranks(query, candidates, groups):
    """Rank of the best hit: sort candidates by similarity, non-hits first among ties."""
    ranks = []
    for i, q in enumerate(query):
        sim = candidates @ q
        hit = groups == groups[i]
        order = sorted(range(len(sim)), key=lambda j: (-sim[j], bool(hit[j])))
        ranks.append(1 + next(r for r, j in enumerate(order) if hit[j]))
    return np.array(ranks)


def test_retrieval_counts_identical_reports_as_hits():
    texts = [b"no acute process", b"effusion", b"no acute process", b"pneumothorax"]
    # Image 0 is closest to text 2: a different study with the same (normal) report.
    images = _unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    reports = _unit([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.1, 0.2, 1.0]])
    out = retrieval.retrieval_report(images, reports, texts, ks=(1, 2))
    i2t, t2i = out["image_to_text"], out["text_to_image"]
    # image 0 -> text 2 (hit, rank 1); image 1 -> text 1; image 2 -> text 2; image 3: text 0
    # (a miss) ties-or-beats text 3 -> rank 2.
    assert i2t["recall@1"] == pytest.approx(0.75) and i2t["recall@2"] == 1.0
    assert i2t["median_rank"] == 1.0
    # text 0 ("no acute process") is closest to image 3 (a miss); image 1 (a miss) ties
    # with its hits (images 0 and 2): rank 3. The other texts find their own image first.
    assert t2i["recall@1"] == pytest.approx(0.75) and t2i["recall@2"] == pytest.approx(0.75)
    assert out["num_distinct_texts"] == 3 and out["num_queries"] == 4
    groups = retrieval.text_groups(texts)
    np.testing.assert_array_equal(
        retrieval.hit_ranks(images, reports, groups), _brute_force_ranks(images, reports, groups)
    )


def test_retrieval_ranks_match_brute_force_with_many_duplicates():
    rng = np.random.default_rng(0)
    n = 60
    groups = rng.integers(0, 12, n)  # Many repeated reports.
    images = _unit(rng.normal(size=(n, 8)))
    texts = _unit(images + rng.normal(size=(n, 8)))
    expected = _brute_force_ranks(images, texts, groups)
    np.testing.assert_array_equal(
        retrieval.hit_ranks(images, texts, groups, chunk_size=7), expected
    )
    np.testing.assert_array_equal(
        retrieval.hit_ranks(texts, images, groups), _brute_force_ranks(texts, images, groups)
    )


def test_constant_embeddings_do_not_look_perfect():
    groups = np.array([0, 1, 2, 3, 0])
    emb = np.ones((5, 3)) / math.sqrt(3)
    ranks = retrieval.hit_ranks(emb, emb, groups)
    # Every non-hit ties with the hits and is counted ahead of them.
    np.testing.assert_array_equal(ranks, [4, 5, 5, 5, 4])


def test_chance_recall():
    assert retrieval.chance_recall(np.arange(20), 5) == pytest.approx(5 / 20)
    groups = np.array([0, 0, 0, 1, 2, 3, 4, 5])  # One report shared by three studies.
    n, k = 8, 2
    expected = np.mean(
        [1 - math.comb(n - h, k) / math.comb(n, k) for h in np.bincount(groups)[groups]]
    )
    assert retrieval.chance_recall(groups, k) == pytest.approx(expected)
    assert retrieval.chance_recall(groups, 100) == pytest.approx(1.0)


def test_text_groups_accept_texts_and_ids():
    np.testing.assert_array_equal(
        retrieval.text_groups(np.array([b"b", b"a", b"b"], dtype=object)), [1, 0, 1]
    )
    np.testing.assert_array_equal(retrieval.text_groups(np.array([7, 3, 7])), [1, 0, 1])


def test_prompt_sets_expand_templates_and_phrases():
    effusion = prompts.prompt_set("Pleural Effusion")
    assert effusion.positive == (
        "pleural effusion.",
        "there is pleural effusion.",
        "findings consistent with pleural effusion.",
    )
    assert effusion.negative == ("no pleural effusion.", "no evidence of pleural effusion.")
    cardiomegaly = prompts.prompt_set("Cardiomegaly")
    assert "there is an enlarged heart." in cardiomegaly.positive
    assert "heart size is normal." in cardiomegaly.negative
    assert "no lines and tubes." in prompts.prompt_set("Support Devices").negative
    normal = prompts.prompt_set("No Finding")
    assert "no acute cardiopulmonary process." in normal.positive
    assert not any(p.startswith("no no") for p in normal.negative)


def test_prompt_config_overrides():
    cfg = prompts.default_prompt_config()
    cfg.positive_templates = ("{finding} is seen",)
    cfg.phrases.edema = ("edema", "vascular congestion")
    out = prompts.prompt_set("Edema", cfg)
    assert out.positive == ("edema is seen", "vascular congestion is seen")
    assert prompts.prompt_set("Lung Lesion", ml_collections.ConfigDict()).positive[0] == (
        "lung lesion."
    )
    cfg.negative_templates = ("no {disease}",)
    with pytest.raises(ValueError, match="finding"):
        prompts.prompt_set("Edema", cfg)
    assert prompts.slug("Pleural Effusion") == "pleural_effusion"
