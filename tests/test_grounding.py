"""Phrase grounding: the synthetic generator's regions, maps, metrics, evaluation and the
`python -m jaxmedclip.ground` entry point."""

import csv
import hashlib
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from input_pipeline import synthetic_cxr
from input_pipeline.images import encode_png
from jaxmedclip import config_lib, evaluate, evaluation, ground, models, parallel, training
from jaxmedclip.evaluation import grounding
from jaxmedclip.evaluation import report as report_lib
from jaxmedclip.methods import local_alignment
from jaxmedclip.vocabulary import LOCALISED_FINDINGS

STEP = 2  # The shared tiny run's last checkpoint (conftest.tiny_run).

# sha256 of the pixels, ids, views, reports and labels of studies drawn by synthetic_cxr
# 1.4.0, before regions were recorded: the trained models and the figures measured on
# that data stay valid only while the generator draws the same bytes.
PINNED_STUDIES = {
    (0, "train", 0, 64, 128): "cdc6dae69610b84b9a93395fa972add031673b35c9703bad6cecdb8dc66d7689",
    (0, "train", 96, 104, 128): "a4a97b9c22bf605b6d5ec015481ad2c5f871aecee8e3b1164d2c80be18c89190",
    (3, "validation", 0, 8, 64): "2e4151c2452277654e493e38eb10f87c5f239e8429115216841929f19c7b3dc3",
}


def _digest(seed, split, start, stop, size):
    h = hashlib.sha256()
    for index in range(start, stop):
        study = synthetic_cxr.generate_study(seed, split, index, size)
        for image in study.images:
            h.update(np.ascontiguousarray(image, np.uint8).tobytes())
        h.update("|".join((study.study_id, study.patient_id, *study.views,
                           study.report)).encode())
        h.update(np.asarray(study.labels, np.float32).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("studies", sorted(PINNED_STUDIES))
def test_generator_draws_the_same_studies_as_before_regions(studies):
    assert _digest(*studies) == PINNED_STUDIES[studies]


def _centroid(mask):
    """(x, y) of a mask's centre in [-1, 1] image coordinates."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    return (xs.mean() + 0.5) / size * 2 - 1, (ys.mean() + 0.5) / size * 2 - 1


def test_regions_mark_where_the_findings_are_drawn():
    seen = set()
    for index in range(120):
        study = synthetic_cxr.generate_study(0, "train", index, 64)
        drawn = {a.label: a for a in study.abnormalities}
        for view, regions in zip(study.views, study.regions, strict=True):
            assert regions.shape == (64, 64) and regions.dtype == np.uint8
            assert regions.max() < 1 << len(LOCALISED_FINDINGS)
            masks = synthetic_cxr.region_masks(regions)
            assert set(masks) <= set(drawn)  # Only drawn findings have a region.
            if view == "LATERAL":
                continue
            for name, mask in masks.items():
                a, (x, y) = drawn[name], _centroid(mask)
                seen.add(name)
                if name == "Pleural Effusion":
                    bottom = (np.nonzero(mask)[0].max() + 0.5) / 32 - 1
                    assert y > -0.1 and bottom > 0.2  # At the bases, rising laterally.
                    if a.side != "bilateral":  # The patient's left is the image's right.
                        assert np.sign(x) == (1 if a.side == "left" else -1)
                elif name == "Pneumothorax":
                    assert np.sign(x) == (1 if a.side == "left" else -1)
                else:  # Consolidation, lung opacity: around their lobe (pose: +-0.2).
                    cx, cy = synthetic_cxr.LOBES[a.lobe]
                    assert abs(x - cx) < 0.25 and abs(y - cy) < 0.3, (index, name, a.lobe)
        if study.is_normal:
            assert all(not r.any() for r in study.regions)
    assert seen == set(LOCALISED_FINDINGS)


def test_pointing_game_and_contrast_to_noise():
    region = np.zeros((4, 4), bool)
    region[:2, :2] = True
    heat = np.zeros((4, 4))
    heat[1, 1] = 1.0
    assert grounding.pointing_hit(heat, region)
    assert not grounding.pointing_hit(heat[::-1, ::-1], region)  # Peak at (2, 2).
    inside = np.array([1.0, 2.0, 3.0, 4.0])
    heat = np.zeros((4, 4))
    heat[:2, :2] = inside.reshape(2, 2)  # Outside: 12 zeros.
    expected = abs(inside.mean() - 0.0) / np.sqrt(inside.var() + 0.0)
    assert grounding.contrast_to_noise(heat, region) == pytest.approx(expected)
    assert grounding.contrast_to_noise(np.ones((4, 4)), region) == 0.0  # Constant map.
    assert np.isnan(grounding.contrast_to_noise(heat, np.ones((4, 4), bool)))

    regions = np.zeros((3, 4, 4), bool)
    regions[0, 0, 0] = regions[1, 0, :2] = regions[2, 3, 3] = True
    maps = np.zeros((3, 4, 4))
    maps[0, 0, 0] = maps[1, 3, 3] = maps[2, 3, 3] = 1.0
    out = grounding.metrics_by_group(maps, regions, ["a", "a", "b"], grid=2)
    a, b = out["per_finding"]["a"], out["per_finding"]["b"]
    assert (a["n"], a["pointing_game"], b["pointing_game"]) == (2, 0.5, 1.0)
    assert a["pointing_game_uniform"] == pytest.approx(3 / 32)  # Mean area fraction.
    # The prior of "a" (its mean mask) peaks at (0, 0): inside both of its regions.
    assert a["pointing_game_prior"] == 1.0
    assert out["mean"]["pointing_game"] == pytest.approx(0.75)
    assert out["mean"]["cnr_random"] > 0  # Noise scores above a constant map's 0.
    assert "cnr_random" not in grounding.metrics_by_group(maps, regions, ["a"] * 3)["mean"]


def _tiny_model(**overrides):
    from test_evaluate_entry import _tiny_config

    config = _tiny_config(**overrides)
    model = models.build_model(config.model, config.data)
    images, tokens = training.dummy_inputs(config.data, 8)
    params = nn.unbox(jax.jit(model.init)(
        jax.random.key(0), np.zeros((1, *images.shape[1:]), images.dtype),
        np.zeros((1, tokens.shape[1]), tokens.dtype)))["params"]
    mesh = parallel.make_mesh(config.mesh)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, *images.shape[1:])).astype(np.float32)
    phrases = rng.integers(4, 64, (3, tokens.shape[1])).astype(np.int32)
    phrases[:, 0], phrases[:, 6], phrases[:, 7:] = 2, models.EOS_ID, 0
    return config, model, params, mesh, images, phrases


def _upsample(low, size):
    grid = int(np.sqrt(low.shape[-1]))
    low = low.reshape(len(low), grid, grid)
    return np.asarray(jax.image.resize(low, (len(low), size, size), "bilinear"))


@pytest.fixture(scope="module")
def tiny_model():
    """A randomly initialised tiny model with local projections, images and phrases."""
    return _tiny_model(**{"model.local_dim": 8})


def test_patch_similarity_maps_are_patch_cosines_averaged_over_phrases(tiny_model):
    config, model, params, mesh, images, phrases = tiny_model
    grounder = grounding.Grounder(model, mesh, parallel.logical_rules(config))
    index = np.array([[0, 1], [2, 0], [1, 1], [0, 0], [2, 2]])
    weights = np.array([[0.5, 0.5], [1, 0], [0.5, 0.5], [1, 0], [1, 0]], np.float32)
    maps = grounder.maps(params, images, phrases, index, weights, batch_size=8)

    def towers(m, x, t):
        return m.image_tower(x)[1], m.encode_text(t)

    patches, text = jax.jit(lambda p: model.apply({"params": p}, images, phrases,
                                                  method=towers))(params)
    emb = np.asarray(models.l2_normalize(patches @ params["image_proj"]["kernel"]))
    cosine = np.einsum("npd,qd->nqp", emb, np.asarray(text))  # [image, phrase, patch]
    low = np.stack([sum(w * cosine[n, q] for q, w in zip(index[n], weights[n], strict=True))
                    for n in range(len(images))])
    np.testing.assert_allclose(maps, _upsample(low, images.shape[1]), atol=1e-5)
    assert maps.shape == (5, 32, 32)
    # Batches padded at the end give the same maps.
    np.testing.assert_allclose(
        grounder.maps(params, images, phrases, index, weights, batch_size=16), maps, atol=1e-6)


def test_word_attention_maps_average_each_words_attention(tiny_model):
    config, model, params, mesh, images, phrases = tiny_model
    starts = np.zeros(config.data.vocab_size, bool)
    starts[::3] = True  # Some pieces continue a word.
    grounder = grounding.Grounder(model, mesh, parallel.logical_rules(config),
                                  kind="word_attention", starts_word=starts, t1=4.0)
    index = np.array([[0], [1], [2], [0], [1]])
    maps = grounder.maps(params, images, phrases, index, np.ones((5, 1), np.float32),
                         batch_size=8)

    def local_features(m, x, t):
        _, patches = m.image_tower(x)
        _, features = m.text_tower(t)
        return m.image_local_proj(patches), m.text_local_proj(features)

    regions, token_features = jax.jit(lambda p: model.apply(
        {"params": p}, images, phrases, method=local_features))(params)
    words, mask = local_alignment.merge_subwords(token_features, phrases, starts)
    unit = lambda x: np.asarray(x) / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
    low = []
    for n, q in enumerate(index[:, 0]):
        cosine = unit(words[q]) @ unit(regions[n]).T  # [words, patches]
        attention = np.exp(4 * cosine)
        attention /= attention.sum(-1, keepdims=True)
        low.append(attention[np.asarray(mask[q])].mean(0))
    np.testing.assert_allclose(maps, _upsample(np.stack(low), 32), atol=1e-5)


@pytest.mark.parametrize("kernels,depth,stride", [((1,), 2, 4), ((3,), 1, 4), ((1,), 1, 2),
                                                  ((1, 3), 1, 2)])
def test_local_patch_head_sees_only_its_receptive_field(kernels, depth, stride):
    """Changing the pixels of one 4 x 4 patch changes, in each branch, the region features
    of the windows that overlap it and of those within (kernel - 1) / 2 * depth cells of
    them, no others; overlapping windows (stride 2) are centred on their cells."""
    head = models.vit.LocalPatchHead(patch_size=4, width=8, depth=depth, kernels=kernels,
                                     stride=stride)
    images = np.random.default_rng(0).normal(size=(2, 24, 24, 1)).astype(np.float32)
    params = jax.jit(head.init)(jax.random.key(0), images)
    changed = images.copy()
    changed[:, 8:12, 12:16] += 1.0
    before, after = (np.asarray(jax.jit(head.apply)(params, x)) for x in (images, changed))
    grid = 24 // stride
    assert before.shape == (2, len(kernels) * grid * grid, 8)
    moved = np.abs(after - before).max(axis=(0, 2)).reshape(len(kernels), grid, grid) > 1e-6
    starts = np.arange(grid) * stride - (4 - stride) // 2  # Window i: [start, start + 4).
    np.testing.assert_array_equal(starts + 2, (np.arange(grid) + 0.5) * stride)  # Centred.
    rows_hit = np.flatnonzero((starts < 12) & (starts + 4 > 8))
    cols_hit = np.flatnonzero((starts < 16) & (starts + 4 > 12))
    rows, cols = np.mgrid[:grid, :grid]
    for branch, kernel in enumerate(kernels):
        reach = (kernel - 1) // 2 * depth
        near = lambda i, hit, reach=reach: (i >= hit.min() - reach) & (i <= hit.max() + reach)
        np.testing.assert_array_equal(moved[branch], near(rows, rows_hit) & near(cols, cols_hit))


@pytest.mark.parametrize("stride,kernels", [(2, (1,)), (4, (1, 3))])
def test_conv_stem_windows_are_centred_and_bounded(stride, kernels):
    """`stem="conv"`: one changed pixel moves, in a kernel-1 branch, exactly the windows
    whose 1 + 2 * stride pixels cover it (window j: rows stride * j - stride / 2 - 1
    onwards, centred half a pixel before its cell's centre), and a kernel-3 branch one window
    further each way; a stride that is not a power of two is refused by name."""
    head = models.vit.LocalPatchHead(patch_size=8, width=16, kernels=kernels, stride=stride,
                                     stem="conv")
    images = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
    params = jax.jit(head.init)(jax.random.key(0), images)
    grid, width = 32 // stride, 1 + 2 * stride
    starts = np.arange(grid) * stride - stride // 2 - 1
    cell_centres = np.arange(grid) * stride + (stride - 1) / 2  # In pixel indices.
    np.testing.assert_allclose(starts + (width - 1) / 2, cell_centres - 0.5)
    for y, x in ((13, 18), (0, 31)):
        changed = images.copy()
        changed[0, y, x] += 1.0
        before, after = (np.asarray(jax.jit(head.apply)(params, a)) for a in (images, changed))
        assert before.shape == (1, len(kernels) * grid * grid, 16)
        moved = np.abs(after - before)[0].max(-1).reshape(len(kernels), grid, grid) > 1e-6
        for branch, kernel in enumerate(kernels):
            reach = (kernel - 1) // 2
            near = [np.convolve((starts <= p) & (p < starts + width), np.ones(2 * reach + 1),
                                "same") > 0 for p in (y, x)]
            np.testing.assert_array_equal(moved[branch], np.outer(*near))
    from test_evaluate_entry import _tiny_config

    config = _tiny_config(**{"model.local_dim": 8, "model.local_source": "patches",
                             "model.local_head_stem": "conv", "model.local_head_stride": 6,
                             "data.image_size": 48})
    with pytest.raises(ValueError, match=r"local_head_stem='conv'.*local_head_stride=6.*power "
                                         r"of two"):
        models.build_model(config.model, config.data)


@pytest.fixture(scope="module")
def sentence_model():
    """A random tiny model whose local alignment reads a patch head and pooled texts."""
    return _tiny_model(**{"model.local_dim": 8, "model.local_source": "patches",
                          "model.local_text": "sentence", "model.local_head_kernels": (1, 3),
                          "model.local_head_stride": 4})


def test_sentence_attention_maps_are_each_phrases_attention_over_patches(sentence_model):
    config, model, params, mesh, images, phrases = sentence_model
    assert "local_head" in params and model.local_text == "sentence"
    grounder = grounding.Grounder(model, mesh, parallel.logical_rules(config),
                                  kind="sentence_attention", t1=10.0)
    index = np.array([[0, 1], [2, 0], [1, 1], [0, 0], [2, 2]])
    weights = np.array([[0.5, 0.5], [1, 0], [0.5, 0.5], [1, 0], [1, 0]], np.float32)
    maps = grounder.maps(params, images, phrases, index, weights, batch_size=8)

    def local_features(m, x, t):  # The head's regions; the text's pooled feature.
        _, patches = m.image_tower(x)
        pooled, _ = m.text_tower(t)
        return m.image_local_proj(m.local_head(x)), m.text_local_proj(pooled)

    regions, texts = jax.jit(lambda p: model.apply(
        {"params": p}, images, phrases, method=local_features))(params)
    unit = lambda x: np.asarray(x) / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
    attention = np.exp(10 * np.einsum("qd,npd->nqp", unit(texts), unit(regions)))
    attention /= attention.sum(-1, keepdims=True)  # Over both branches' regions...
    attention = attention.reshape(*attention.shape[:2], 2, -1).sum(2)  # ...summed per place.
    grid = images.shape[1] // 4
    assert regions.shape[1] == 2 * grid * grid
    low = np.stack([sum(w * attention[n, q] for q, w in zip(index[n], weights[n], strict=True))
                    for n in range(len(images))])
    np.testing.assert_allclose(maps, _upsample(low, images.shape[1]), atol=1e-5)
    # Spread over the windows' pixels: the same maps through `spread`.
    spread = grounding.Grounder(model, mesh, parallel.logical_rules(config),
                                kind="sentence_attention", t1=10.0, sigma=4.0)
    np.testing.assert_allclose(
        spread.maps(params, images, phrases, index, weights, batch_size=8),
        grounding.spread(maps, 4.0), atol=1e-6)
    # The kind must match the model; the entry points pick it from the config.
    with pytest.raises(ValueError, match=r"word_attention maps need a model whose local_text "
                                         r"is words"):
        grounding.Grounder(model, mesh, parallel.logical_rules(config), kind="word_attention",
                           starts_word=np.ones(64, bool))
    assert grounding.map_kind(config_lib.load_config("experiments/tiny_synthetic.py")) \
        == "sentence_attention"


def test_spread_is_a_normalised_gaussian_and_follows_the_head():
    """`spread` blurs by a Gaussian of sigma pixels (sums kept away from the edges; 0: as
    is); `map_spread` is the head's stride for maps over a head, 0 for the towers' patch
    maps, and eval.grounding_spread when set."""
    maps = np.zeros((2, 33, 33), np.float32)
    maps[0, 16, 16], maps[1, 0, 0] = 1.0, 1.0
    out = np.asarray(grounding.spread(maps, 2.0))
    x = np.arange(-16, 17)
    gauss = np.exp(-0.5 * (x / 2.0) ** 2)
    gauss /= gauss[np.abs(x) <= 6].sum()  # Taps out to 3 sigma.
    np.testing.assert_allclose(out[0], np.outer(gauss, gauss) * (np.abs(x) <= 6)[:, None]
                               * (np.abs(x) <= 6)[None, :], atol=1e-7)
    assert out[0].sum() == pytest.approx(1.0, abs=1e-6)
    assert np.unravel_index(np.argmax(out[1]), (33, 33)) == (0, 0)  # Edges repeated.
    np.testing.assert_array_equal(grounding.spread(maps, 0.0), maps)
    noise = grounding.random_maps(4, 8, 32, seed=0)
    smooth = grounding.random_maps(4, 8, 32, seed=0, sigma=4.0)
    np.testing.assert_allclose(smooth, grounding.spread(noise, 4.0), atol=1e-6)

    quickstart = config_lib.load_config("experiments/tiny_synthetic.py")
    assert grounding.map_spread(quickstart) == quickstart.model.local_head_stride == 4
    towers = config_lib.apply_overrides(quickstart, ["loss.local.weight=0.0"])
    assert grounding.map_spread(towers) == 0.0
    quickstart.eval.grounding_spread = 2.5
    assert grounding.map_spread(quickstart) == 2.5
    quickstart.eval.grounding_spread = -1.0
    with pytest.raises(ValueError, match=r"eval.grounding_spread=-1.0 must be >= 0"):
        grounding.map_spread(quickstart)


def test_box_masks_follow_the_resize_with_pad():
    region = ground.BoxRegion("x.png", "left", "L", [(0.0, 0.0, 40.0, 40.0)], (80.0, 40.0))
    mask = ground.box_mask(region, (40, 80), 32)  # 80 wide, 40 high: padded above/below.
    expected = np.zeros((32, 32), bool)
    expected[8:24, :16] = True  # Scale 32/80; 8 rows of padding on top.
    np.testing.assert_array_equal(mask, expected)
    # The image was read downscaled (a builder's source_max_size): the same region.
    np.testing.assert_array_equal(ground.box_mask(region, (20, 40), 32), expected)
    tiny = ground.BoxRegion("x.png", "dot", "L", [(10.0, 10.0, 0.5, 0.5)], (80.0, 40.0))
    assert ground.box_mask(tiny, (40, 80), 32).sum() >= 1  # Never an empty region.


@pytest.fixture(scope="module")
def restored(tiny_run):
    """(config, setup, params, builder, tokenizer) of the shared 2-step run."""
    from input_pipeline import pipeline

    experiment, workdir = tiny_run
    config = config_lib.load_config(experiment)
    builder, tokenizer = pipeline.prepare(config.data)
    setup = evaluate.model_setup(config)
    params, _ = evaluate.restore_params(setup, workdir, STEP)
    return config, setup, params, builder, tokenizer


def test_records_hold_regions_and_evaluation_scores_them(restored):
    import tensorflow_datasets as tfds

    config, setup, params, builder, tokenizer = restored
    source = builder.as_data_source("validation",
                                    decoders={"image": tfds.decode.SkipDecoding()})
    synthetic = config.data.synthetic
    studies = {s.study_id: s for s in (
        synthetic_cxr.generate_study(synthetic.seed, "validation", i, synthetic.source_image_size)
        for i in range(synthetic.num_validation))}
    for i in range(len(source)):
        record = source[i]
        study = studies[record["study_id"].decode()]
        view = study.views.index(record["view"].decode())
        np.testing.assert_array_equal(record["regions"][..., 0], study.regions[view])

    cfg = evaluation.eval_config(config)
    out = grounding.grounding_report(cfg, config, setup.model, params, setup.mesh, builder,
                                     tokenizer, "validation")
    assert out["map"] == "patch_similarity" and list(out["per_finding"]) == list(
        LOCALISED_FINDINGS)
    scored = [r for r in out["per_finding"].values() if r["n"]]
    assert scored and sum(r["n"] for r in scored) >= out["num_images"] > 0
    for r in scored:
        assert 0 <= r["pointing_game"] <= 1 and 0 < r["pointing_game_uniform"] < 0.5
        assert r["cnr"] >= 0 and r["cnr_random"] > 0
    cases = grounding.synthetic_cases(builder, "validation", config.data, LOCALISED_FINDINGS)
    assert all(region.any() for region in cases.regions)
    assert out["prompts"]["Pneumothorax"] == list(
        evaluation.prompts.prompt_set("Pneumothorax", cfg.prompts).positive)
    flat = report_lib.flat_metrics({"grounding": out})
    assert "eval/grounding_mean_pointing_game" in flat
    table = report_lib.summary_table({"grounding": out})
    assert "pointing" in table and "Pleural Effusion" in table


def test_ground_draws_overlays_and_names_unreadable_images(tiny_run, tmp_path):
    experiment, workdir = tiny_run
    study = synthetic_cxr.generate_study(0, "test", 3, 64)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(encode_png(study.images[0]))
    second.write_bytes(encode_png(np.tile(np.arange(48, dtype=np.uint8), (40, 1))))
    out = tmp_path / "maps.png"
    maps = ground.main(["--config", experiment, "--workdir", workdir, "--phrase",
                        "pleural effusion.", "--phrase", "pneumothorax.", "--image", str(first),
                        "--image", str(second), "--out", str(out)])
    assert maps.shape == (2, 2, 32, 32) and np.isfinite(maps).all()
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match=f"cannot read --image {tmp_path / 'missing.dcm'}"):
        ground.main(["--config", experiment, "--workdir", workdir, "--phrase", "x",
                     "--image", str(tmp_path / "missing.dcm"), "--out", str(out)])


def test_ground_refuses_local_maps_from_an_export(tmp_path):
    """Exports hold no local parameters: a local-term config with --hf stops before any
    loading, naming the two ways out."""
    with pytest.raises(SystemExit, match=r"sentence attention maps .* exports do not hold: "
                                         r"ground from the checkpoint \(--workdir\), or add "
                                         r"--config.loss.local.weight=0"):
        ground.main(["--config", "experiments/tiny_synthetic.py", "--hf", str(tmp_path),
                     "--phrase", "x", "--image", str(tmp_path / "x.png"),
                     "--out", str(tmp_path / "m.png")])


def test_ground_scores_a_phrase_box_csv(tiny_run, tmp_path):
    experiment, workdir = tiny_run
    images = tmp_path / "images"
    rows = []
    for index in range(12):
        study = synthetic_cxr.generate_study(0, "test", index, 64)
        for name, mask in synthetic_cxr.region_masks(study.regions[0]).items():
            path = f"files/s{index}.png"
            os.makedirs(images / "files", exist_ok=True)
            (images / path).write_bytes(encode_png(study.images[0]))
            ys, xs = np.nonzero(mask)
            rows.append(dict(dicom_id=index, category_name=name, label_text=name.lower(),
                             path=path, x=xs.min(), y=ys.min(), w=xs.max() - xs.min() + 1,
                             h=ys.max() - ys.min() + 1, image_width=64, image_height=64,
                             split="test"))
    rows.append({**rows[0], "path": "files/gone.png"})
    rows.append({**rows[0], "split": "train", "label_text": "another phrase"})
    csv_path = tmp_path / "ms_cxr.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "metrics.json"
    result = ground.main(["--config", experiment, "--workdir", workdir, "--boxes",
                          str(csv_path), "--images-root", str(images), "--split", "test",
                          "--out", str(out)])
    labels = {r["category_name"] for r in rows[:-2]}
    written = json.loads(out.read_text())
    assert set(written["per_finding"]) == labels
    assert sum(r["n"] for r in written["per_finding"].values()) == written["num_regions"]
    assert written["num_regions"] == len(rows) - 2
    assert [s["path"] for s in written["skipped"]] == ["files/gone.png"]
    assert result["mean"]["pointing_game"] == written["mean"]["pointing_game"]
    with pytest.raises(SystemExit, match="lacks the columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("path,phrase\nx.png,y\n")
        ground.main(["--config", experiment, "--workdir", workdir, "--boxes", str(bad),
                     "--images-root", str(images)])


@pytest.mark.slow
def test_evaluate_reports_grounding_unless_switched_off(tiny_run, tmp_path, capsys):
    import shutil

    experiment, workdir = tiny_run
    copy = str(tmp_path / "work")
    shutil.copytree(workdir, copy)
    quick = ["--config.eval.linear_probe=False", "--config.eval.drafting=False"]
    report = evaluate.main(["--config", experiment, "--workdir", copy, *quick])
    assert report["grounding"]["map"] == "patch_similarity"
    written = json.loads(open(os.path.join(copy, "eval", str(STEP), "report.json")).read())
    assert written["grounding"]["mean"] == report["grounding"]["mean"]
    assert "grounding (patch similarity maps)" in capsys.readouterr().out
    report = evaluate.main(["--config", experiment, "--workdir", copy, *quick,
                            "--config.eval.grounding=False"])
    assert "grounding" not in report
