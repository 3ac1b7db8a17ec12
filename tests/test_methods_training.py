"""Medical CLIP methods as config switches of the sharded train step (issue #9).

- `loss.local` (GLoRIA local alignment): the 8-device train step equals a dense
  single-device reference of global + weight * local (loss and gradients), for the
  `all_gather` and `ring` implementations and with GradCache micro-batches;
- `loss.targets="soft_labels"` (MedCLIP semantic matching), `loss.local` and
  `loss.multiview` (CXR-CLIP) run in the train step of their example configs
  (experiments/medclip_synthetic.py, gloria_synthetic.py, cxrclip_synthetic.py) on
  synthetic studies, and the loss falls;
- `loss.multiview` is refused without `data.multiview` (and the reverse), with GradCache
  and with `loss.local`;
- default configs keep their parameter tree and outputs (no local parameters);
- text-label examples (`image_mask` False, MedCLIP's decoupled reports): medclip_synthetic
  with `text_fraction` trains, and the masks reach the loss through the train step and
  GradCache (the masked images do not change loss or gradients).
"""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from input_pipeline import synthetic_cxr
from input_pipeline import tokenizer as tokenizer_lib
from jaxmedclip import config_lib, losses, models, optim, parallel, training
from jaxmedclip.methods import local_alignment as la

GLOBAL_BATCH = 16
LOCAL = dict(weight=0.5, t1=3.0, t2=4.0, t3=8.0, max_words=6)


def _build_model(config):
    """The configured model, with `model.local_dim` applied even where `build_model` does
    not read it yet."""
    model = models.build_model(config.model, config.data)
    local_dim = config.model.get("local_dim")
    if model.local_dim != local_dim:
        model = model.clone(local_dim=local_dim)
    return model


# ------------------------------------------------------------ sharded step = dense reference


def _small_config(impl):
    """A pinned tiny model (compiles in seconds) with the local term on."""
    config = config_lib.config_from_flags("experiments/tiny_synthetic.py:runlocal", [])
    config.global_batch_size = GLOBAL_BATCH
    config.data.update(image_size=16, max_text_len=12, vocab_size=64)
    config.model.embed_dim = 16
    config.model.local_dim = 8
    config.model.image.update(width=16, num_heads=2, depth=1, patch_size=4, pool="cls")
    config.model.text.update(width=16, num_heads=2, depth=1)
    config.loss = ml_collections.ConfigDict(
        dict(name="softmax", impl=impl, local=ml_collections.ConfigDict(LOCAL))
    )
    config.optim.warmup_steps = 0
    return config


def _random_batch(config, seed=0):
    """Random images and token rows (BOS, pieces, EOS, padding); the last example is
    padding (mask False)."""
    rng = np.random.default_rng(seed)
    b, size, length = config.global_batch_size, config.data.image_size, config.data.max_text_len
    lengths = rng.integers(4, length + 1, b)
    tokens = rng.integers(4, config.data.vocab_size, (b, length)).astype(np.int32)
    tokens[:, 0] = 2
    tokens[np.arange(b), lengths - 1] = models.EOS_ID
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = models.PAD_ID
    mask = np.ones((b,), bool)
    mask[-1] = False
    return {
        "image": rng.normal(size=(b, size, size, 1)).astype(np.float32),
        "tokens": tokens,
        "mask": mask,
    }


def _random_word_starts(vocab_size, seed=0):
    starts = np.random.default_rng(seed).random(vocab_size) < 0.6
    starts[list(la.SPECIAL_IDS)] = False
    return starts


def _dense_reference(model, config, params, batch, word_starts):
    """(loss, global, local, grads) of global + weight * local on one device, no mesh."""
    local = config.loss.local

    def total(params):
        out = model.apply({"params": params}, batch["image"], batch["tokens"])
        global_loss, _ = losses.contrastive_loss(
            out["image_emb"], out["text_emb"], out["scale"], out["bias"], batch,
            config=dict(name="softmax", impl="dense"), mesh=None, batch_axes=(),
        )
        if model.local_text == "sentence":  # [B, 1, D]: one "word" per text.
            words = out["text_local"]
            word_mask = np.ones(words.shape[:2], bool)
        else:
            words, word_mask = la.merge_subwords(
                out["text_local"], batch["tokens"], word_starts, max_words=local.max_words
            )
        local_loss, _ = la.local_alignment_loss(
            out["image_local"], words, word_mask, batch["mask"],
            t1=local.t1, t2=local.t2, t3=local.t3, impl="dense",
        )
        return global_loss + local.weight * local_loss, (global_loss, local_loss)

    device = jax.devices()[0]
    params, batch = jax.device_put((params, batch), device)
    (loss, (global_loss, local_loss)), grads = jax.jit(
        jax.value_and_grad(total, has_aux=True)
    )(params)
    return jax.device_get((loss, global_loss, local_loss, grads))


class Setup:
    """A sharded model on the 8-device mesh, its state, one batch and the dense reference."""

    def __init__(self, config, mesh_overrides=()):
        self.config = config_lib.apply_overrides(config, list(mesh_overrides))
        self.mesh = parallel.make_mesh(self.config.mesh)
        self.rules = parallel.logical_rules(self.config)
        self.model = _build_model(self.config)
        self.state, self.shardings = training.create_train_state(
            self.model, optax.sgd(1.0), self.config.data, self.mesh, self.rules, seed=0
        )
        self.host_batch = _random_batch(self.config)
        self.batch = parallel.host_to_global(self.host_batch, self.mesh)
        self.word_starts = _random_word_starts(self.config.data.vocab_size)
        self.params = jax.device_get(self.state.params)
        self.reference = _dense_reference(
            self.model, self.config, self.params, self.host_batch, self.word_starts
        )


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    leaves = zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    for path, a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=path)


@pytest.fixture(scope="module")
def setup():
    assert len(jax.devices()) == 8
    return Setup(_small_config("all_gather"))


@pytest.mark.parametrize("impl", ["all_gather", "ring"])
def test_local_loss_train_step_equals_dense_reference(setup, impl):
    """One SGD step at learning rate 1 on data=8: params - grads, grads of the reference."""
    loss_config = ml_collections.ConfigDict(setup.config.loss.to_dict())
    loss_config.impl = impl
    step = training.make_train_step(
        setup.model, optax.sgd(1.0), lambda _: 1.0, loss_config, setup.mesh, setup.rules,
        setup.shardings, word_starts=setup.word_starts,
    )
    state = jax.tree.map(lambda x: x.copy(), setup.state)  # The step donates it.
    new_state, metrics = step(state, setup.batch)
    loss, global_loss, local_loss, grads = setup.reference
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/global"]), global_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/local"]), local_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, global_loss + LOCAL["weight"] * local_loss, rtol=1e-6)
    np.testing.assert_allclose(
        0.5 * (float(metrics["local/loss_i2t"]) + float(metrics["local/loss_t2i"])),
        local_loss, rtol=1e-5,
    )
    step_grads = jax.tree.map(lambda p, q: p - q, setup.params, jax.device_get(new_state.params))
    _assert_trees_close(step_grads, grads)
    # Not trivially zero: the local projections and both towers learn from the step.
    for name in ("image_local_proj", "text_local_proj", "image_tower", "text_tower"):
        assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads[name])) > 1e-4, name


@pytest.fixture(scope="module")
def sentence_setup():
    """`setup` with the Quickstart's grounding term: a one-patch head, pooled texts."""
    config = _small_config("all_gather")
    config.model.update(local_source="patches", local_text="sentence", local_head_stem="conv",
                        local_head_kernels=(1, 3), local_head_stride=2)
    return Setup(config)


@pytest.mark.parametrize("stop", [pytest.param(False, marks=pytest.mark.slow), True])
def test_local_stop_gradient_keeps_the_local_term_out_of_the_towers(sentence_setup, stop):
    """With model.local_stop_gradient the towers' gradients are those of the global loss
    alone, while the head and both local projections still learn; without it the text
    tower also learns from the local term."""
    setup = sentence_setup
    config = config_lib.apply_overrides(setup.config, [f"model.local_stop_gradient={stop}"])
    model = _build_model(config)
    reference = lambda weight: _dense_reference(
        model, config_lib.apply_overrides(config, [f"loss.local.weight={weight}"]),
        setup.params, setup.host_batch, setup.word_starts)[3]
    grads, global_grads = reference(1.0), reference(0.0)
    for name in ("local_head", "image_local_proj", "text_local_proj"):
        assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads[name])) > 1e-4, name
    _assert_trees_close(grads["image_tower"], global_grads["image_tower"])
    if stop:
        _assert_trees_close(grads["text_tower"], global_grads["text_tower"])
    else:
        assert not all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(
            jax.tree.leaves(grads["text_tower"]), jax.tree.leaves(global_grads["text_tower"]),
            strict=True))


@pytest.mark.parametrize("impl", ["all_gather", pytest.param("ring", marks=pytest.mark.slow)])
def test_sentence_local_term_train_step_equals_dense_reference(sentence_setup, impl):
    """The attention-pooled term over the patch head: one sharded SGD step = the dense
    reference's gradients; no word-start table is needed."""
    setup = sentence_setup
    loss_config = ml_collections.ConfigDict(setup.config.loss.to_dict())
    loss_config.impl = impl
    step = training.make_train_step(
        setup.model, optax.sgd(1.0), lambda _: 1.0, loss_config, setup.mesh, setup.rules,
        setup.shardings,
    )
    state = jax.tree.map(lambda x: x.copy(), setup.state)
    new_state, metrics = step(state, setup.batch)
    loss, global_loss, local_loss, grads = setup.reference
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/local"]), local_loss, rtol=1e-5, atol=1e-5)
    step_grads = jax.tree.map(lambda p, q: p - q, setup.params, jax.device_get(new_state.params))
    _assert_trees_close(step_grads, grads)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads["local_head"])) > 1e-4
    if impl == "all_gather":
        return
    # The head learns from the local term only; the image tower from the global loss only.
    _, _, _, global_grads = _dense_reference(
        setup.model, config_lib.apply_overrides(setup.config, ["loss.local.weight=0.0"]),
        setup.params, setup.host_batch, setup.word_starts)
    np.testing.assert_allclose(
        jax.tree.leaves(grads["image_tower"])[0], jax.tree.leaves(global_grads["image_tower"])[0],
        rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_local_loss_with_gradcache_equals_dense_reference(setup):
    """GradCache (2 micro-batches) caches patch and token features too: same gradients."""
    fn = training.make_loss_and_grads(
        setup.model, setup.config.loss, setup.mesh, microbatch_size=GLOBAL_BATCH // 2,
        word_starts=setup.word_starts,
    )
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        (loss, metrics), grads = jax.jit(fn)(setup.state.params, setup.batch)
    ref_loss, global_loss, local_loss, ref_grads = setup.reference
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/local"]), local_loss, rtol=1e-5, atol=1e-5)
    _assert_trees_close(jax.device_get(grads), ref_grads)


def test_local_loss_needs_model_projections_and_word_starts(setup):
    mesh, loss_config = setup.mesh, setup.config.loss
    with pytest.raises(ValueError, match=r"needs the tokenizer's word-start table"):
        training.make_loss_and_grads(setup.model, loss_config, mesh)
    plain = setup.model.clone(local_dim=None)
    with pytest.raises(ValueError, match=r"set model.local_dim"):
        training.make_loss_and_grads(plain, loss_config, mesh, word_starts=setup.word_starts)
    bad = ml_collections.ConfigDict(loss_config.to_dict())
    bad.local.t4 = 1.0
    with pytest.raises(ValueError, match=r"loss.local.t4 is not a config field"):
        training.make_loss_and_grads(setup.model, bad, mesh, word_starts=setup.word_starts)
    # Weight 0 (or no loss.local) is the plain global loss: nothing else is needed.
    off = ml_collections.ConfigDict(loss_config.to_dict())
    off.local.weight = 0.0
    assert training.LocalTerm.from_config(off, None, plain) is None
    assert training.LocalTerm.from_config(setup.config.loss, setup.word_starts, setup.model)


# ------------------------------------------------------------------- default configs unchanged


DEFAULT_PARAMS = {"bias", "image_proj", "image_tower", "log_scale", "text_proj", "text_tower"}


def _param_shapes(model, config):
    images, tokens = training.dummy_inputs(config.data, 2)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    return jax.tree.map(lambda x: x.shape, nn.unbox(variables["params"]))


@pytest.mark.parametrize(
    "name", ["tiny_synthetic.py:local_weight=0", "tiny_synthetic.py:runlocal",
             "medclip_synthetic.py", "cxrclip_synthetic.py", "vit_b16_mimic.py"]
)
def test_configs_without_local_loss_keep_their_param_tree(name):
    config = config_lib.load_config(f"experiments/{name}")
    assert config.loss.get("local") is None and config.model.get("local_dim") is None
    model = models.build_model(config.model, config.data)
    assert model.local_dim is None
    assert set(_param_shapes(model, config)) == DEFAULT_PARAMS


@pytest.mark.slow
def test_local_projections_are_additions_only():
    """The gloria config adds exactly the two local projections; the shared parameters
    give the same embeddings as the model without them."""
    config = config_lib.load_config("experiments/gloria_synthetic.py:runlocal")
    config.data.update(image_size=16, max_text_len=12)
    config.model.image.update(patch_size=4, depth=1)
    config.model.text.update(depth=1)
    local_model = _build_model(config)
    plain_model = local_model.clone(local_dim=None)
    shapes = _param_shapes(local_model, config)
    width_i, width_t = config.model.image.width, config.model.text.width
    local_dim = config.model.local_dim
    assert set(shapes) == DEFAULT_PARAMS | {"image_local_proj", "text_local_proj"}
    assert shapes["image_local_proj"] == {"kernel": (width_i, local_dim)}
    assert shapes["text_local_proj"] == {"kernel": (width_t, local_dim)}
    plain_shapes = _param_shapes(plain_model, config)
    assert plain_shapes == {k: v for k, v in shapes.items() if k in DEFAULT_PARAMS}

    batch = _random_batch(config)
    params = nn.unbox(
        local_model.init(jax.random.key(1), batch["image"][:2], batch["tokens"][:2])["params"]
    )
    local_out = local_model.apply({"params": params}, batch["image"], batch["tokens"])
    plain_params = {k: v for k, v in params.items() if k in DEFAULT_PARAMS}
    plain_out = plain_model.apply({"params": plain_params}, batch["image"], batch["tokens"])
    assert set(plain_out) == {"image_emb", "text_emb", "scale", "bias"}
    assert set(local_out) == set(plain_out) | {"image_local", "text_local"}
    for key in plain_out:
        np.testing.assert_array_equal(local_out[key], plain_out[key], err_msg=key)
    patches = (config.data.image_size // config.model.image.patch_size) ** 2
    b, length = batch["tokens"].shape
    assert local_out["image_local"].shape == (b, patches, local_dim)
    assert local_out["text_local"].shape == (b, length, local_dim)


# ------------------------------------------------- example configs train on synthetic studies


@pytest.fixture(scope="module")
def studies():
    """Synthetic studies (64-pixel images, reports, labels) and a BPE tokenizer trained on
    their reports, like the pipeline's for tiny_synthetic."""
    return [synthetic_cxr.generate_study(0, "train", i, source_image_size=64) for i in range(160)]


@pytest.fixture(scope="module")
def sentencepiece_model(studies, tmp_path_factory):
    texts = [" ".join(synthetic_cxr.report_sections(s.report)) for s in studies]
    prefix = str(tmp_path_factory.mktemp("spm") / "bpe")
    return tokenizer_lib.train_sentencepiece(texts, prefix, vocab_size=512, model_type="bpe")


def _study_batch(config, studies, model_path):
    """The first `global_batch_size` studies as the pipeline gives them: normalised first
    view, report tokens, labels with blanks set to 0 and `labels_present`."""
    tok = tokenizer_lib.Tokenizer(model_path, config.data.max_text_len)
    chosen = studies[: config.global_batch_size]
    images = np.stack([s.images[0] for s in chosen]).astype(np.float32) / 255.0
    images = (images - config.data.image_mean) / config.data.image_std
    texts = [" ".join(synthetic_cxr.report_sections(s.report)) for s in chosen]
    labels = np.stack([s.labels for s in chosen])
    present = ~np.isnan(labels)
    b = len(chosen)
    return {
        "image": images[..., None],
        "tokens": tok.encode_batch(texts),
        "study_id": np.arange(b, dtype=np.int32),
        "text_id": np.arange(b, dtype=np.int32),
        "labels": np.where(present, labels, 0.0).astype(np.float32),
        "labels_present": present,
        "mask": np.ones((b,), bool),
        "num_skipped": np.zeros((b,), np.int32),
    }


def _word_starts(model_path, vocab_size):
    """The tokenizer's word-start table, padded (False) to the model's vocabulary."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model_path)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    table = np.zeros((vocab_size,), bool)
    table[: len(pieces)] = la.word_start_table(pieces)
    return table


def _train(config, batch, word_starts=None, steps=5):
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    model = _build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    state, shardings = training.create_train_state(model, tx, config.data, mesh, rules, seed=0)
    step = training.make_train_step(
        model, tx, schedule, config.loss, mesh, rules, shardings, word_starts=word_starts
    )
    history = []
    for _ in range(steps):
        # The same batch each step: the loss on it must fall as the model fits it.
        state, metrics = step(state, parallel.host_to_global(batch, mesh))
        history.append(jax.device_get(metrics))
    return history


def _example_config(name):
    # A small learning rate: the first full-size Adam step moves every weight by about
    # the learning rate at once, and at 1e-3 or more that overshoots on a fresh model
    # (the loss on the same batch rises before it falls).
    return config_lib.config_from_flags(
        f"experiments/{name}.py:runlocal",
        [f"global_batch_size={GLOBAL_BATCH}", "optim.warmup_steps=1", "optim.learning_rate=3e-4"],
    )


# Also covered through `main` on real batches: tests/test_experiments_cli.py.
@pytest.mark.slow
def test_medclip_config_trains_with_soft_label_targets(studies, sentencepiece_model):
    config = _example_config("medclip_synthetic")
    assert config.loss.targets == "soft_labels"
    batch = _study_batch(config, studies, sentencepiece_model)
    # Studies that share their findings are soft positives of each other.
    rows = [tuple(r) for r in batch["labels"]]
    assert len(set(rows)) < len(rows)
    history = _train(config, batch)
    loss = [float(m["loss"]) for m in history]
    assert all(np.isfinite(loss)) and loss[-1] < loss[0], loss


# Also covered through `main` on real batches: tests/test_experiments_cli.py.
@pytest.mark.slow
def test_gloria_config_trains_with_local_loss(studies, sentencepiece_model):
    config = _example_config("gloria_synthetic")
    assert config.loss.local.weight > 0
    batch = _study_batch(config, studies, sentencepiece_model)
    table = _word_starts(sentencepiece_model, config.data.vocab_size)
    history = _train(config, batch, word_starts=table)
    total = [float(m["loss"]) for m in history]
    local = [float(m["loss/local"]) for m in history]
    assert all(np.isfinite(total)) and total[-1] < total[0], total
    assert local[-1] < local[0], local
    for m in history:
        expected = float(m["loss/global"]) + config.loss.local.weight * float(m["loss/local"])
        np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)


def _multiview_batch(config, studies, model_path):
    """`_study_batch` plus the second view (the study's other view, or its only image
    flipped and brightened, standing in for a second augmentation) and, as the second
    text, the impression (the first text is then the findings)."""
    batch = _study_batch(config, studies, model_path)
    tok = tokenizer_lib.Tokenizer(model_path, config.data.max_text_len)
    chosen = studies[: config.global_batch_size]
    second = [s.images[1] if len(s.images) > 1 else np.clip(s.images[0][:, ::-1] * 1.1, 0, 255)
              for s in chosen]
    images = np.stack(second).astype(np.float32) / 255.0
    sections = [synthetic_cxr.report_sections(s.report) for s in chosen]
    b = len(chosen)
    return {
        **batch,
        "tokens": tok.encode_batch([f for f, _ in sections]),
        "image2": ((images - config.data.image_mean) / config.data.image_std)[..., None],
        "tokens2": tok.encode_batch([i for _, i in sections]),
        "text_id2": np.arange(b, dtype=np.int32),
    }


# Also covered through `main` on real batches: tests/test_experiments_cli.py.
@pytest.mark.slow
def test_cxrclip_config_trains_with_multiview_terms(studies, sentencepiece_model):
    config = _example_config("cxrclip_synthetic")
    assert config.data.multiview and config.data.augment
    weights = config.loss.multiview
    assert (weights.image_text_weight, weights.image_image_weight,
            weights.text_text_weight) == (1.0, 1.0, 0.5)
    batch = _multiview_batch(config, studies, sentencepiece_model)
    assert set(batch) == set(training.abstract_batch(config))
    assert any(len(s.views) == 2 for s in studies[:GLOBAL_BATCH])
    history = _train(config, batch)
    loss = [float(m["loss"]) for m in history]
    assert all(np.isfinite(loss)) and loss[-1] < loss[0], loss
    for m in history:
        expected = (float(m["loss_image_text"]) + float(m["loss_image_image"])
                    + 0.5 * float(m["loss_text_text"]))
        np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
        assert float(m["acc_i2t"]) == float(m["image1_text1/acc_i2t"])
    # Both views and both texts learn: every term falls.
    for term in ("loss_image_text", "loss_image_image", "loss_text_text"):
        assert float(history[-1][term]) < float(history[0][term]), term


def test_multiview_refusals(setup):
    config = config_lib.load_config("experiments/cxrclip_synthetic.py:runlocal")
    training.check_config(config)
    no_views = config_lib.apply_overrides(config, ["data.multiview=False"])
    with pytest.raises(ValueError, match=r"loss.multiview .* set data.multiview=True"):
        training.check_config(no_views)
    no_loss = ml_collections.ConfigDict(config.to_dict())
    del no_loss.loss["multiview"]
    with pytest.raises(ValueError, match=r"data.multiview=True .* set loss.multiview"):
        training.check_config(no_loss)
    # A batch without the second view and text names the data switch.
    plain = ml_collections.ConfigDict(config.loss.to_dict())
    fn = training.make_loss_and_grads(setup.model, plain, setup.mesh)
    with pytest.raises(ValueError, match=r"\['image2', 'tokens2'\].*data.multiview=True"):
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            jax.eval_shape(fn, setup.state.params, setup.batch)


def test_multiview_objective_adds_the_local_term_on_the_first_view_and_text(sentence_setup):
    """CXR-CLIP's terms plus the local term (the Quickstart's objective): the loss is the
    multi-view loss plus weight x the local loss of (view 1, text 1), sharded as the
    dense reference computes it."""
    setup = sentence_setup
    second = _random_batch(setup.config, seed=1)
    batch = {**setup.host_batch, "image2": second["image"], "tokens2": second["tokens"]}
    loss_config = ml_collections.ConfigDict(setup.config.loss.to_dict())
    loss_config.multiview = ml_collections.ConfigDict(dict(text_text_weight=0.5))
    fn = training.make_loss_and_grads(setup.model, loss_config, setup.mesh)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        (loss, metrics), _ = jax.jit(fn)(setup.state.params,
                                         parallel.host_to_global(batch, setup.mesh))
    # The dense reference's local loss reads the first view and text, like `setup`'s.
    _, _, local_loss, _ = setup.reference
    np.testing.assert_allclose(float(metrics["loss/local"]), local_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        float(loss), float(metrics["loss/global"]) + LOCAL["weight"] * local_loss, rtol=1e-5)
    expected_global = (float(metrics["loss_image_text"]) + float(metrics["loss_image_image"])
                       + 0.5 * float(metrics["loss_text_text"]))
    np.testing.assert_allclose(float(metrics["loss/global"]), expected_global, rtol=1e-5)


# ------------------------------------------------------------ text-label examples


# Also covered through `main` on real batches: tests/test_experiments_cli.py.
@pytest.mark.slow
def test_medclip_config_trains_with_text_only_rows(studies, sentencepiece_model):
    config = config_lib.config_from_flags(
        "experiments/medclip_synthetic.py:runlocal,text_fraction=0.25",
        [f"global_batch_size={GLOBAL_BATCH}", "optim.warmup_steps=1", "optim.learning_rate=3e-4"],
    )
    assert config.data.decoupled.text_only_fraction == 0.25
    training.check_config(config)
    batch = _study_batch(config, studies, sentencepiece_model)
    # A quarter of the rows are reports without their image, as the pipeline chooses them
    # (rows with a non-zero label row).
    labelled = np.flatnonzero(batch["labels"].any(axis=1))
    text_only = np.zeros(GLOBAL_BATCH, bool)
    text_only[np.random.default_rng(0).choice(labelled, GLOBAL_BATCH // 4, replace=False)] = True
    batch.update(label_prompt=np.zeros(GLOBAL_BATCH, bool), image_mask=~text_only,
                 text_mask=np.ones(GLOBAL_BATCH, bool))
    assert set(batch) == set(training.abstract_batch(config))
    history = _train(config, batch)
    loss = [float(m["loss"]) for m in history]
    assert all(np.isfinite(loss)) and loss[-1] < loss[0], loss


@pytest.mark.slow  # 30 s; the losses' own mask tests (test_losses.py) run by default.
def test_image_masks_reach_the_loss_in_the_step_and_gradcache():
    config = _small_config("ring")
    config.model.local_dim = None
    config.loss = ml_collections.ConfigDict(dict(name="softmax", impl="ring",
                                                 targets="soft_labels"))
    mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config)
    model = _build_model(config)
    state, _ = training.create_train_state(model, optax.sgd(1.0), config.data, mesh, rules,
                                          seed=0)
    rng = np.random.default_rng(1)
    batch = _random_batch(config)
    batch["labels"] = rng.integers(-1, 2, (GLOBAL_BATCH, 14)).astype(np.float32)
    batch["image_mask"] = np.arange(GLOBAL_BATCH) % 4 != 1
    batch["text_mask"] = np.ones(GLOBAL_BATCH, bool)
    noisy = dict(batch, image=batch["image"].copy())
    noisy["image"][~batch["image_mask"]] = rng.normal(size=noisy["image"][:4].shape)

    def run(fn, host_batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            (loss, _), grads = jax.jit(fn)(state.params, parallel.host_to_global(host_batch,
                                                                                   mesh))
        return float(loss), jax.device_get(grads)

    full = training.make_loss_and_grads(model, config.loss, mesh)
    loss, grads = run(full, batch)
    # A masked image is not seen: other pixels there give the same loss and gradients.
    noisy_loss, noisy_grads = run(full, noisy)
    np.testing.assert_allclose(noisy_loss, loss, rtol=1e-6)
    _assert_trees_close(noisy_grads, grads)
    unmasked_loss, _ = run(full, {k: v for k, v in noisy.items() if k != "image_mask"})
    assert abs(unmasked_loss - loss) > 1e-3
    # GradCache computes the loss on the whole batch's embeddings: the same masks apply.
    micro = training.make_loss_and_grads(model, config.loss, mesh,
                                        microbatch_size=GLOBAL_BATCH // 2)
    micro_loss, micro_grads = run(micro, noisy)
    np.testing.assert_allclose(micro_loss, loss, rtol=1e-5, atol=1e-5)
    _assert_trees_close(micro_grads, grads)
