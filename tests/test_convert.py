"""Import of Hugging Face weights into our towers (`jaxmedclip.convert.load_pretrained`)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import linen as nn  # noqa: E402

from jaxmedclip import convert, models, training  # noqa: E402
from jaxmedclip.convert import rules  # noqa: E402

SIZE, MAX_LEN, VOCAB, WIDTH = 32, 16, 64, 32
DIMS = dict(
    hidden_size=WIDTH,
    intermediate_size=4 * WIDTH,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
VISION = dict(DIMS, image_size=SIZE, patch_size=8, num_channels=1)
TEXT = dict(
    DIMS,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_LEN,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)


def our_model(image=None, text=None, scan=False):
    model = ml_collections.ConfigDict(
        dict(
            name="two_tower",
            embed_dim=24,
            dtype="float32",
            param_dtype="float32",
            remat=False,
            scan_layers=scan,
            temperature_init=10.0,
            max_scale=100.0,
            bias_init=-10.0,
            image=dict(
                name="vit",
                patch_size=8,
                width=WIDTH,
                depth=2,
                num_heads=2,
                mlp_ratio=4.0,
                pool="cls",
                num_channels=1,
            )
            | (image or {}),
            text=dict(
                name="transformer",
                variant="causal",
                width=WIDTH,
                depth=2,
                num_heads=2,
                mlp_ratio=4.0,
            )
            | (text or {}),
        )
    )
    data = ml_collections.ConfigDict(dict(image_size=SIZE, vocab_size=VOCAB, max_text_len=MAX_LEN))
    module = models.build_model(model, data)
    variables = module.init(
        jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)), jnp.zeros((1, MAX_LEN), jnp.int32)
    )
    return module, nn.unbox(variables["params"])


def save_random(hf_model, folder):
    """Random init plus noise (HF zero-initialises biases), saved as safetensors."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.eval().save_pretrained(folder, safe_serialization=True)
    return hf_model


def inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 1, SIZE, SIZE)).astype(np.float32)
    tokens = np.zeros((8, MAX_LEN), np.int64)
    for row, n in zip(tokens, rng.integers(0, MAX_LEN - 2, 8), strict=True):
        row[: n + 2] = [2, *rng.integers(4, VOCAB, n), 3]
    return images, tokens


def towers_out(module, params, images, tokens):
    pooled_image, _ = module.apply(
        {"params": params},
        jnp.asarray(images.transpose(0, 2, 3, 1)),
        method=lambda m, x: m.image_tower(x),
    )
    pooled_text, _ = module.apply(
        {"params": params}, jnp.asarray(tokens, jnp.int32), method=lambda m, t: m.text_tower(t)
    )
    return np.asarray(pooled_image), np.asarray(pooled_text)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_clip_import_gives_same_tower_outputs(scan, tmp_path):
    hf = save_random(
        transformers.CLIPModel(
            transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
        ),
        tmp_path,
    )
    module, params = our_model(image=dict(pre_norm=True), scan=scan)
    params = convert.load_pretrained(params, str(tmp_path), towers=("image", "text"))
    images, tokens = inputs()
    ours_image, ours_text = towers_out(module, params, images, tokens)
    with torch.no_grad():
        close(ours_image, hf.vision_model(pixel_values=torch.from_numpy(images)).pooler_output)
        mask = torch.from_numpy(tokens != 0).long()
        close(
            ours_text,
            hf.text_model(input_ids=torch.from_numpy(tokens), attention_mask=mask).pooler_output,
        )


@pytest.mark.parametrize("prefixed", [False, True])
def test_standalone_clip_vision_tower_import(prefixed, tmp_path):
    """`CLIPVisionModel` folders: transformers 5 writes `embeddings.*`, transformers 4 wrote
    `vision_model.embeddings.*`; both load."""
    from safetensors.numpy import load_file, save_file

    config = transformers.CLIPVisionConfig(**VISION)
    hf = save_random(transformers.CLIPVisionModel(config), tmp_path)
    if prefixed:
        path = str(tmp_path / "model.safetensors")
        tensors = load_file(path)
        assert not any(k.startswith("vision_model.") for k in tensors)
        save_file({f"vision_model.{k}": v for k, v in tensors.items()}, path)
    module, params = our_model(image=dict(pre_norm=True))
    params = convert.load_pretrained(params, str(tmp_path), towers=("image",))
    images, tokens = inputs()
    ours_image, _ = towers_out(module, params, images, tokens)
    with torch.no_grad():
        close(ours_image, hf(pixel_values=torch.from_numpy(images)).pooler_output)


def test_siglip_vit_and_bert_import(tmp_path):
    images, tokens = inputs()
    mask = torch.from_numpy(tokens != 0).long()
    siglip = save_random(
        transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)),
        tmp_path / "siglip",
    )
    module, params = our_model(
        image=dict(pool="map"), text=dict(variant="bidirectional", pool="last")
    )
    params = convert.load_pretrained(params, str(tmp_path / "siglip"))
    ours_image, ours_text = towers_out(module, params, images, tokens)
    with torch.no_grad():
        close(ours_image, siglip.vision_model(pixel_values=torch.from_numpy(images)).pooler_output)
        hidden = siglip.text_model(input_ids=torch.from_numpy(tokens), attention_mask=mask)
        close(ours_text, hidden.last_hidden_state[:, -1])

    vit = save_random(transformers.ViTModel(transformers.ViTConfig(**VISION)), tmp_path / "vit")
    bert = save_random(
        transformers.BertModel(
            transformers.BertConfig(
                **{
                    k: v
                    for k, v in TEXT.items()
                    if not k.endswith(("bos_token_id", "eos_token_id"))
                }
            )
        ),
        tmp_path / "bert",
    )
    module, params = our_model(text=dict(variant="bidirectional", layout="bert"))
    params = convert.load_pretrained(params, str(tmp_path / "vit"), towers=("image",))
    params = convert.load_pretrained(params, str(tmp_path / "bert"), towers="text")
    ours_image, ours_text = towers_out(module, params, images, tokens)
    with torch.no_grad():
        out = vit(pixel_values=torch.from_numpy(images))
        close(ours_image, out.last_hidden_state[:, 0])  # ViTModel's output is normed.
        close(
            ours_text, bert(input_ids=torch.from_numpy(tokens), attention_mask=mask).pooler_output
        )


def test_mismatches_are_listed_together(tmp_path):
    save_random(
        transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=TEXT,
                vision_config=dict(VISION, hidden_size=48, intermediate_size=96),
                projection_dim=24,
            )
        ),
        tmp_path,
    )
    _, params = our_model()  # No pre_norm, and a 32-wide vision tower.
    with pytest.raises(convert.ConversionError) as error:
        convert.load_pretrained(params, str(tmp_path), towers=("image",))
    message = str(error.value)
    assert "pre_layrnorm.weight" in message and "not in our model" in message
    assert "encoder.layers.1.mlp.fc2.weight (48, 96)" in message
    assert "model.image.pre_norm=True" in message
    assert len(error.value.problems) > 20


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    _, params = our_model()
    with pytest.raises(ValueError, match="pickled weights.*safetensors"):
        convert.load_pretrained(params, str(tmp_path), towers=("text",))


@pytest.mark.slow
def test_rules_round_trip_every_vision_table():
    """Our params -> Hugging Face names -> our params, exactly (no torch involved)."""
    from jaxmedclip.convert import towers

    cases = [
        (towers.CLIP_VISION, dict(pre_norm=True)),
        (towers.VIT, {}),
        (towers.SIGLIP_VISION, dict(pool="map")),
    ]
    for table, image in cases:
        _, params = our_model(image=image, scan=True)
        flat = rules.unstack_layers(rules.flatten(params["image_tower"]))
        theirs = rules.to_hf(table.export_ours(flat), list(table.rules))
        theirs.update(table.export_extra(flat))
        back = rules.from_hf(
            table.import_theirs(theirs),
            list(table.rules),
            {k: np.shape(v) for k, v in flat.items()},
        )
        for name, value in flat.items():
            if name == "patch_embed/bias" and table is towers.CLIP_VISION:
                continue  # Folded into the positions (and zero on import).
            np.testing.assert_array_equal(back[name], value, err_msg=f"{table.kind} {name}")


def test_init_from_loads_towers_into_a_sharded_train_state(tmp_path):
    """`config.init_from` in a training config: the image tower comes from the folder, the
    rest keeps its initialisation, and the state stays sharded over the 8-device mesh."""
    from jaxmedclip import config_lib

    save_random(
        transformers.CLIPModel(
            transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
        ),
        tmp_path,
    )
    config = config_lib.config_from_flags(
        "experiments/tiny_synthetic.py:runlocal",
        [
            f"data.image_size={SIZE}",
            f"data.vocab_size={VOCAB}",
            f"data.max_text_len={MAX_LEN}",
            "model.embed_dim=24",
            f"model.image.width={WIDTH}",
            "model.image.num_heads=2",
            f"model.text.width={WIDTH}",
            "model.text.num_heads=2",
        ],
    )
    config.model.image.pre_norm = True
    config.init_from = ml_collections.ConfigDict(dict(path=str(tmp_path), towers=("image",)))
    setup = training.build(config)
    fresh = training.initial_state(setup, config)
    loaded = training.init_from_pretrained(config, fresh, setup)
    expected = convert.load_pretrained(
        jax.device_get(fresh.params), str(tmp_path), towers=("image",)
    )
    shardings = jax.tree.leaves(setup.shardings.params)
    for leaf, sharding in zip(jax.tree.leaves(loaded.params), shardings, strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    np.testing.assert_array_equal(
        jax.device_get(loaded.params["image_tower"]["pos_embed"]),
        expected["image_tower"]["pos_embed"],
    )
    np.testing.assert_array_equal(  # The text tower keeps its random initialisation.
        jax.device_get(loaded.params["text_tower"]["pos_embed"]),
        jax.device_get(fresh.params["text_tower"]["pos_embed"]),
    )
    assert not np.array_equal(
        expected["image_tower"]["pos_embed"],
        jax.device_get(fresh.params["image_tower"]["pos_embed"]),
    )
