"""Export to Hugging Face transformers: the folder loads with Auto* classes, and both
frameworks give the same token ids, embeddings and logits (float32, 1e-4)."""

import os
import textwrap

import numpy as np
import pytest
from pytorch_side import import_torch_and_transformers  # noqa: E402

torch, transformers = import_torch_and_transformers()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from PIL import Image  # noqa: E402

from input_pipeline import synthetic_cxr  # noqa: E402
from input_pipeline.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from jaxmedclip import checkpointing, config_lib, export, models, training  # noqa: E402

SIZE, MAX_LEN, VOCAB = 32, 24, 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny towers; each variant sets the options its format needs.
EXPERIMENT = textwrap.dedent(
    """
    from experiments import tiny_synthetic

    VARIANTS = {
        "clip": dict(image=dict(pre_norm=True)),
        "siglip": dict(image=dict(pool="map"), text=dict(variant="bidirectional", pool="last"),
                       image_projection=False, embed_dim=32, loss="sigmoid"),
        "dual_vit": dict(text=dict(variant="bidirectional", layout="bert")),
        "dual_clip": dict(image=dict(pre_norm=True),
                          text=dict(variant="bidirectional", layout="bert")),
        "dual_siglip": dict(image=dict(pool="map"),
                            text=dict(variant="bidirectional", layout="bert")),
        "mean_pool": dict(image=dict(pool="mean")),
    }

    def get_config(arg=None):
        variant, _, scan = (arg or "clip").partition(",")
        options = VARIANTS[variant]
        c = tiny_synthetic.get_config("runlocal=True")
        c.global_batch_size = 8
        c.data.image_size, c.data.max_text_len, c.data.vocab_size = 32, 24, 256
        c.model.scan_layers = scan == "scan"
        c.model.embed_dim = options.get("embed_dim", 24)
        c.model.image.update(dict(patch_size=8, width=32, depth=2, num_heads=2, pre_norm=False))
        c.model.image.update(options.get("image", {}))
        c.model.text.update(dict(width=32, depth=2, num_heads=2))
        c.model.text.update(options.get("text", {}))
        if "image_projection" in options:
            c.model.image_projection = options["image_projection"]
        c.loss.name = options.get("loss", "softmax")
        if c.loss.name == "sigmoid":
            c.loss.targets = "one_hot"
        return c
    """
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("experiments") / "export_tiny.py"
    path.write_text(EXPERIMENT)
    return str(path)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    reports = [synthetic_cxr.generate_study(0, "train", i, 16).report for i in range(300)]
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return train_sentencepiece(reports, prefix, VOCAB, "bpe")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, SIZE, SIZE), dtype=np.uint8)
    reports = [synthetic_cxr.generate_study(1, "test", i, 16).report for i in range(7)]
    reports.append("No acute cardiopulmonary process. " * 20)  # Truncated: EOS kept.
    return images, reports


def noisy(params):
    """Random init plus noise: non-zero biases and norms exercise every mapping."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def write_checkpoint(config, workdir):
    """A real orbax checkpoint (step 3) in `workdir`, as training writes it."""
    setup = training.build(config)
    state = training.initial_state(setup, config)
    state = state.replace(params=noisy(state.params), step=state.step + 3)
    manager = checkpointing.make_manager(workdir)
    checkpointing.save(manager, 3, state, force=True)
    manager.wait_until_finished()
    manager.close()
    return setup.model, state.params


def our_outputs(model, params, config, images, tokens):
    x = (images.astype(np.float32) / 255.0 - config.data.image_mean) / config.data.image_std
    variables = {"params": params}
    image_emb = model.apply(variables, jnp.asarray(x[..., None]), method=model.encode_image)
    text_emb = model.apply(variables, jnp.asarray(tokens), method=model.encode_text)
    scale, bias = model.apply(variables, method=model.temperature)
    logits = scale * image_emb @ text_emb.T
    if config.loss.name == "sigmoid":
        logits = logits + bias
    return np.asarray(image_emb), np.asarray(text_emb), np.asarray(logits)


def export_with_cli(experiment, variant, fmt, spm_model, tmp_path):
    """Checkpoint in a workdir -> `python -m jaxmedclip.export` (in-process)."""
    config = config_lib.load_config(f"{experiment}:{variant}")
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    model, params = write_checkpoint(config, workdir)
    args = ["--config", f"{experiment}:{variant}", "--workdir", workdir, "--out", out]
    export.main(args + ["--format", fmt, "--tokenizer", spm_model, "--checkpoint", "3"])
    return config, model, params, out


def export_directly(experiment, variant, fmt, spm_model, tmp_path):
    """Params from `build_model` (no checkpoint) -> `export.export`."""
    config = config_lib.load_config(f"{experiment}:{variant}")
    model = models.build_model(config.model, config.data)
    images, tokens = training.dummy_inputs(config.data)
    variables = model.init(
        jax.random.key(0), jnp.zeros(images.shape), jnp.zeros(tokens.shape, jnp.int32)
    )
    params = noisy(nn.unbox(variables["params"]))
    out = str(tmp_path / "hf")
    export.export(config, params, spm_model, out, fmt)
    return config, model, params, out


@pytest.mark.parametrize(
    "variant, fmt, hf_class, via_cli",
    [
        pytest.param("clip,scan", "auto", "CLIPModel", True, marks=pytest.mark.slow),
        # The CLI path (checkpoint, recorded tokenizer) is covered for CLIP in
        # test_export_cli.py; here every format goes through `export.export`.
        # Slow: the SigLIP towers are also exported by dual_siglip below.
        pytest.param("siglip", "auto", "SiglipModel", False, marks=pytest.mark.slow),
        ("clip", "clip", "CLIPModel", False),
        ("dual_vit", "auto", "VisionTextDualEncoderModel", False),
        ("dual_clip", "dual_encoder", "VisionTextDualEncoderModel", False),
        ("dual_siglip", "dual_encoder", "VisionTextDualEncoderModel", False),
    ],
)
def test_export_matches_transformers(
    variant, fmt, hf_class, via_cli, experiment, spm_model, batch, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(ROOT)
    run = export_with_cli if via_cli else export_directly
    config, model, params, out = run(experiment, variant, fmt, spm_model, tmp_path)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))

    hf_model = transformers.AutoModel.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert type(hf_model).__name__ == hf_class

    images, reports = batch
    our_tokens = Tokenizer(spm_model, MAX_LEN).encode_batch(reports)
    text = hf_tokenizer(reports, padding="max_length", truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(text["input_ids"].numpy(), our_tokens)
    pixels = processor([Image.fromarray(im) for im in images], return_tensors="pt")
    with torch.no_grad():
        output = hf_model(**text, pixel_values=pixels["pixel_values"])

    image_emb, text_emb, logits = our_outputs(model, params, config, images, our_tokens)
    np.testing.assert_allclose(output.image_embeds.numpy(), image_emb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(output.text_embeds.numpy(), text_emb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(output.logits_per_image.numpy(), logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "variant, fmt, messages",
    [
        (
            "clip",
            "siglip",
            [
                "model.image.pool='cls'",
                "formats that accept it: clip, dual_encoder",
                "model.image.pre_norm=True",
            ],
        ),
        (
            "dual_vit",
            "clip",
            [
                "model.image.pre_norm=False",
                "formats that accept it: siglip, dual_encoder",
                "model.text.layout='bert'",
            ],
        ),
        ("siglip", "clip", ["model.image_projection=False", "loss.name='sigmoid'"]),
        ("mean_pool", "auto", ["model.image.pool='mean'", "no format accepts it"]),
    ],
)
def test_inexpressible_options_are_refused(
    variant, fmt, messages, experiment, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(ROOT)
    with pytest.raises(ValueError) as error:
        export.main(
            [
                "--config",
                f"{experiment}:{variant}",
                "--workdir",
                str(tmp_path),
                "--out",
                str(tmp_path / "hf"),
                "--format",
                fmt,
            ]
        )
    for message in messages:
        assert message in str(error.value)
    assert not os.path.exists(tmp_path / "hf")


def test_image_processor_reproduces_pipeline_on_square_images(experiment, tmp_path, monkeypatch):
    """The supported numeric path: square 8-bit PNGs at the model's size."""
    tf = pytest.importorskip("tensorflow")
    from input_pipeline import pipeline

    monkeypatch.syspath_prepend(ROOT)
    config = config_lib.load_config(f"{experiment}:clip")
    processor_config = export.image_processor_config(config, "clip")
    processor = transformers.CLIPImageProcessor(
        **{k: v for k, v in processor_config.items() if k != "image_processor_type"}
    )
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8)
    ours = np.stack(
        [
            pipeline.image_preprocess(
                tf.constant(synthetic_cxr.encode_png(im)), config.data
            ).numpy()
            for im in images
        ]
    )
    theirs = processor([Image.fromarray(im) for im in images], return_tensors="np")
    np.testing.assert_allclose(theirs["pixel_values"], ours.transpose(0, 3, 1, 2), atol=1e-5)


UNIGRAM_GAP = pytest.mark.xfail(
    strict=False,
    reason="known gap, why export refuses unigram models by default: on rare texts "
    "`tokenizers`' Unigram picks another, equally scored segmentation than SentencePiece "
    "(2 of 9744 ids on this table, from '___'); BPE is exact",
)


def test_unigram_tokenizer_is_refused_unless_allowed(tmp_path):
    from jaxmedclip.convert.tokenizer import check_exact, save_tokenizer

    texts = [synthetic_cxr.generate_study(0, "train", i, 16).report for i in range(100)]
    unigram = train_sentencepiece(texts, str(tmp_path / "uni"), VOCAB, "unigram")
    bpe = train_sentencepiece(texts, str(tmp_path / "bpe"), VOCAB, "bpe")
    check_exact(bpe)  # Exact: nothing to refuse.
    with pytest.raises(ValueError, match="unigram.*--allow_inexact_tokenizer"):
        save_tokenizer(unigram, MAX_LEN, str(tmp_path))
    assert not os.path.exists(tmp_path / "tokenizer.json")  # Nothing written.
    save_tokenizer(unigram, MAX_LEN, str(tmp_path), allow_inexact=True)
    assert os.path.exists(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("model_type", ["bpe", pytest.param("unigram", marks=UNIGRAM_GAP)])
def test_tokenizer_gives_our_ids(model_type, tmp_path):
    from jaxmedclip.convert.tokenizer import save_tokenizer

    train_texts = [synthetic_cxr.generate_study(0, "train", i, 16).report for i in range(300)]
    spm = train_sentencepiece(train_texts, str(tmp_path / "spm"), VOCAB, model_type)
    held_out = [synthetic_cxr.generate_study(2, "test", i, 16).report for i in range(300)]
    rng = np.random.default_rng(0)
    shuffled = [" ".join(rng.permutation(t.split())) for t in held_out[:100]]
    odd = ["", "   ", "Héllo  WORLD\tüber\n\nx", "ñ#@! 123", "a" * 300, "No\u00a0acute  process"]
    texts = held_out + shuffled + odd
    for max_len in (MAX_LEN, 8):
        save_tokenizer(spm, max_len, str(tmp_path), allow_inexact=model_type == "unigram")
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        ids = hf(texts, padding="max_length", truncation=True, return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(ids, Tokenizer(spm, max_len).encode_batch(texts))
