"""Evaluation config, sharded embedding, and `python -m jaxmedclip.evaluate` end to end."""

import json
import math
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxmedclip import config_lib, evaluate, evaluation, models, parallel, train, training
from jaxmedclip.evaluation import embed

TINY = {
    "data.image_size": 32,
    "data.max_text_len": 16,
    "data.vocab_size": 64,
    "model.embed_dim": 16,
    "model.image.width": 32,
    "model.image.depth": 1,
    "model.image.num_heads": 2,
    "model.text.width": 32,
    "model.text.depth": 1,
    "model.text.num_heads": 2,
}


def _tiny_config(**overrides):
    items = {**TINY, **overrides}
    return config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal", [f"{k}={v}" for k, v in items.items()]
    )


def test_eval_config_defaults_and_errors():
    config = _tiny_config()
    del config.eval
    cfg = evaluation.eval_config(config)  # No `eval` section: all defaults.
    assert cfg.bootstrap_samples == 1000 and tuple(cfg.probe_fractions) == (0.01, 0.1, 1.0)
    config.eval = {"bootstrap_samples": 10, "prompts": {"phrases": {"fracture": ("rib fx",)}}}
    cfg = evaluation.eval_config(config)
    assert cfg.bootstrap_samples == 10 and cfg.prompts.phrases.fracture == ("rib fx",)
    assert cfg.prompts.phrases.pneumothorax == ("pneumothorax",)  # Defaults kept.
    config.eval = {"bootstrap_sample": 10}
    with pytest.raises(KeyError, match="bootstrap_samples"):
        evaluation.eval_config(config)
    config.eval = {"zero_shot_findings": ("Pleural Effusions",)}
    with pytest.raises(ValueError, match="Pleural Effusions"):
        evaluation.eval_config(config)


def test_embedder_matches_unsharded_model_and_drops_padding():
    config = _tiny_config()
    mesh = parallel.make_mesh(config.mesh)
    assert parallel.batch_shards(mesh) == 8
    rules = parallel.logical_rules(config)
    model = models.build_model(config.model, config.data)
    images, tokens = training.dummy_inputs(config.data, 16)
    rng = np.random.default_rng(0)

    def batch(mask):
        toks = rng.integers(4, 64, tokens.shape).astype(np.int32)
        toks[:, 0], toks[:, 9], toks[:, 10:] = 2, models.EOS_ID, 0
        return {
            "image": rng.normal(size=images.shape).astype(np.float32),
            "tokens": toks,
            "mask": np.asarray(mask),
            "labels": rng.choice([-1.0, 0.0, 1.0], (16, 14)).astype(np.float32),
            "text_id": np.arange(16, dtype=np.int32) + 100 * int(np.sum(mask)),
            "text": np.array([f"report {i}".encode() for i in range(16)], dtype=object),
        }

    batches = [batch(np.ones(16, bool)), batch(np.arange(16) < 5)]
    variables = jax.jit(model.init)(
        jax.random.key(0), batches[0]["image"][:1], batches[0]["tokens"][:1]
    )
    params = nn.unbox(variables)["params"]
    embedder = embed.Embedder(model, mesh, rules)
    out = embedder.embed_batches(params, batches)
    # Reference: the unsharded model on the valid rows, on one device.
    kept = {
        key: np.concatenate([b[key][b["mask"]] for b in batches])
        for key in ("image", "tokens", "labels")
    }
    expected_image, expected_text = jax.jit(
        lambda p, x, t: (
            model.apply({"params": p}, x, method="encode_image"),
            model.apply({"params": p}, t, method="encode_text"),
        )
    )(params, kept["image"], kept["tokens"])
    assert out.num_examples == 21
    np.testing.assert_allclose(out.image_emb, expected_image, atol=2e-5)
    np.testing.assert_allclose(out.text_emb, expected_text, atol=2e-5)
    np.testing.assert_array_equal(out.labels, kept["labels"])
    assert out.texts == [f"report {i}".encode() for i in list(range(16)) + list(range(5))]
    assert out.text_keys()[3] == b"report 3"

    images_only = embedder.embed_batches(params, batches[:1], with_text=False)
    assert images_only.text_emb is None
    np.testing.assert_allclose(images_only.image_emb, expected_image[:16], atol=2e-5)

    prompt_tokens = batches[0]["tokens"][:3]  # 3 rows: padded to the 8 batch shards inside.
    np.testing.assert_allclose(
        embedder.embed_tokens(params, prompt_tokens), expected_text[:3], atol=2e-5
    )
    scale = embedder.scale(params)
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)


def _experiment_file(tmp_path):
    """An experiment: the tiny runlocal config with a small eval section and tiny data."""
    path = tmp_path / "tiny_eval.py"
    path.write_text(
        textwrap.dedent(f"""
        from jaxmedclip import config_lib, evaluation, training

        def get_config(arg=None):
            config = config_lib.load_config("experiments/tiny_synthetic.py:runlocal")
            overrides = {dict(TINY)!r}
            overrides.update({{
                "total_steps": 2,
                "optim.warmup_steps": 1,
                "global_batch_size": 16,
                "data.data_dir": {str(tmp_path / "data")!r},
                "data.synthetic.num_train": 96,
                "data.synthetic.num_validation": 48,
                "data.synthetic.num_test": 48,
                "data.synthetic.source_image_size": 64,
            }})
            config = config_lib.apply_overrides(
                config, [f"{{k}}={{v}}" for k, v in overrides.items()]
            )
            config.eval = evaluation.default_config()
            config.eval.batch_size = 16
            config.eval.bootstrap_samples = 200
            return config
    """)
    )
    return str(path)


def test_entry_flags_and_missing_checkpoints(tmp_path):
    own, args, overrides = evaluate.parse_flags(
        ["--config", "x.py", "--checkpoint", "3", "--workdir", "w", "--config.eval.seed=1"]
    )
    assert (own.checkpoint, own.split, args.config, args.workdir) == (3, None, "x.py", "w")
    assert overrides == ["eval.seed=1"]
    experiment = _experiment_file(tmp_path)
    with pytest.raises(SystemExit, match="train into --workdir"):
        evaluate.main(["--config", experiment, "--workdir", str(tmp_path / "empty")])


@pytest.mark.slow
def test_evaluate_entry_writes_report(tmp_path, capsys):
    pytest.importorskip("input_pipeline.pipeline")
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    from input_pipeline import pipeline

    experiment = _experiment_file(tmp_path)
    workdir = tmp_path / "work"
    train.main(["--config", experiment, "--workdir", str(workdir)])
    evaluate.main(["--config", experiment, "--workdir", str(workdir)])  # The latest: step 2.

    report = json.loads((workdir / "eval" / "2" / "report.json").read_text())
    assert report["step"] == 2 and report["split"] == "test"
    assert report["num_examples"] >= 48  # One row per image; some studies have two views.
    zero_shot = report["zero_shot"]
    assert 0 <= zero_shot["mean_auc"] <= 1
    assert set(zero_shot["auc"]) == set(report["eval_config"]["zero_shot_findings"])
    scored = 0
    for result in zero_shot["auc"].values():
        if result["value"] is None:
            assert result["reason"]
            continue
        scored += 1
        assert 0 <= result["value"] <= 1
        if result["ci"] is not None:
            low, high = result["ci"]
            assert 0 <= low <= result["value"] <= high <= 1
    assert scored >= 3
    i2t = report["retrieval"]["image_to_text"]
    assert 0 <= i2t["recall@1"] <= i2t["recall@5"] <= i2t["recall@10"] <= 1
    assert i2t["chance"]["recall@1"] <= i2t["chance"]["recall@10"]
    assert report["retrieval"]["text_to_image"]["median_rank"] >= 1
    probe = report["linear_probe"]["fractions"]
    assert set(probe) == {"1%", "10%", "100%"}
    assert probe["1%"]["n_train"] == max(1, round(0.01 * report["linear_probe"]["n_train_total"]))
    for result in probe.values():
        for name, auc in result["auc"].items():
            assert (auc is None and name in result["skipped"]) or 0 <= auc <= 1
    assert report["multiclass"]["accuracy"] is None or 0 <= report["multiclass"]["accuracy"] <= 1
    assert (workdir / "eval" / "2" / "roc_zero_shot.png").exists()
    events = list((workdir / "tensorboard" / "eval_test").iterdir())
    logged = {}
    for record in tf.data.TFRecordDataset([str(p) for p in events]).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            logged[value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
    assert logged["eval/zero_shot_mean_auc"] == (2, pytest.approx(zero_shot["mean_auc"]))
    assert logged["eval/i2t_recall@10"] == (2, pytest.approx(i2t["recall@10"]))
    out = capsys.readouterr().out
    assert "zero-shot" in out and "retrieval" in out and "linear probe" in out
    assert math.isfinite(report["zero_shot"]["logit_scale"])

    # A missing step says which exist.
    with pytest.raises(SystemExit, match="available"):
        evaluate.main(["--config", experiment, "--workdir", str(workdir), "--checkpoint", "7"])

    # What the training loop calls: flat scalars, and a report per split when given a workdir.
    config = config_lib.load_config(experiment)
    setup = training.build(config)
    params, step = evaluate.restore_params(setup, str(workdir), None)
    builder, tokenizer = pipeline.prepare(config.data)
    flat = evaluation.evaluate(
        config,
        setup.model,
        params,
        setup.mesh,
        builder,
        tokenizer,
        "validation",
        str(workdir),
        step=step,
        embedder=embed.Embedder(setup.model, setup.mesh, setup.rules),
    )
    assert 0 <= flat["eval/zero_shot_mean_auc"] <= 1
    assert flat["eval/i2t_recall@1"] <= flat["eval/i2t_recall@10"]
    assert not any(key.startswith("eval/probe") for key in flat)  # Not during training.
    validation = json.loads((workdir / "eval" / "2" / "validation" / "report.json").read_text())
    assert validation["split"] == "validation"
    assert validation["zero_shot"]["mean_auc"] == pytest.approx(flat["eval/zero_shot_mean_auc"])
