"""benchmarks/torch_baseline.py: the PyTorch twin is the JAX model (parameter counts,
decay mask) with the JAX loss, and its benchmark runs and reports."""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest
from pytorch_side import import_torch_and_transformers

torch, transformers = import_torch_and_transformers()

from jaxmedclip import config_lib, evaluate, export, optim  # noqa: E402
from jaxmedclip.convert import layouts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = importlib.util.spec_from_file_location(
    "torch_baseline", os.path.join(REPO, "benchmarks", "torch_baseline.py")
)
torch_baseline = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(torch_baseline)

TINY = "experiments/tiny_synthetic.py:runlocal"
VIT_B16 = "experiments/vit_b16_mimic.py"
# The tiny config in the layout SigLIP exports: attention-pool head, no pre-norm, a
# bidirectional text tower read at the last position, no image projection, sigmoid loss.
SIGLIP = ["model.image.pool=map", "model.image.pre_norm=False",
          "model.text.variant=bidirectional", "model.text.pool=last",
          "model.image_projection=False", "loss.name=sigmoid"]


def load(spec: str, overrides=()):
    return config_lib.config_from_flags(os.path.join(REPO, spec), list(overrides))


def meta_match(config):
    """(format, Correspondence) of the config's torch twin, built on the meta device."""
    fmt = torch_baseline.check_supported(config)
    model = torch_baseline.build_hf_model(config, fmt, "meta")
    return fmt, torch_baseline.correspond(model, config, fmt)


def test_tiny_clip_has_the_jax_parameters_less_the_named_ones():
    config = load(TINY)
    fmt, match = meta_match(config)
    counts = torch_baseline.parameter_counts(match, fmt)
    width = config.model.image.width
    assert fmt == "clip"
    # CLIP has no patch-embedding bias (width numbers) and no sigmoid-loss bias (1).
    assert counts["num_params"] == counts["jax_num_params"] - width - 1 == 532_609
    assert match.ours["logit_scale"] == ["log_scale"]
    assert sorted(match.ours["vision_model.encoder.layers.1.self_attn.q_proj.weight"]) == [
        "image_tower/encoder/block_1/attn/query_kernel"]


def test_vit_b16_recipe_has_the_jax_parameters_less_the_named_ones():
    config = load(VIT_B16)  # Scanned layers: compared per layer.
    fmt, match = meta_match(config)
    counts = torch_baseline.parameter_counts(match, fmt)
    assert counts == {"num_params": 140_340_737, "jax_num_params": 140_341_506}
    assert counts["jax_num_params"] - counts["num_params"] == 768 + 1


def test_siglip_layout_counts_the_text_head_bias():
    config = load(TINY, SIGLIP)
    fmt, match = meta_match(config)
    counts = torch_baseline.parameter_counts(match, fmt)
    assert fmt == "siglip"
    assert counts["num_params"] == counts["jax_num_params"] + config.model.embed_dim
    assert match.ours["logit_bias"] == ["bias"]
    assert len(match.ours["vision_model.head.attention.in_proj_weight"]) == 3  # q, k, v


def test_a_count_difference_names_the_tensors():
    config = load(TINY, ["model.local_dim=16"])  # Projections CLIPModel does not have.
    fmt, match = meta_match(config)
    with pytest.raises(ValueError) as e:
        torch_baseline.parameter_counts(match, fmt)
    message = str(e.value)
    assert "532609 parameters, the JAX model 535778" in message
    assert "image_local_proj/kernel (96, 16) has no torch counterpart" in message
    assert "image_tower/patch_embed/bias (96" in message  # The accounted ones are named too.


def jax_mask_in_torch_names(config, fmt: str) -> dict[str, bool]:
    """The JAX optimizer's decay mask of the model's (possibly scanned) parameters,
    exported like weights (1.0 decayed, 0.0 not) by the export's own conversion: torch
    name -> decayed."""
    abstract = evaluate.model_setup(config).abstract_params
    mask = optim.decay_mask(abstract, decay_embeddings=config.optim.decay_embeddings)
    filled = jax.tree.map(lambda x, m: np.full(x.shape, float(m), np.float32), abstract, mask)
    exported = layouts.to_hf(filled, export.layout(config, fmt))
    out = {}
    for name, value in exported.items():
        assert np.all(value == value.flat[0]), f"{name} is partly decayed"
        out[name] = bool(value.flat[0] == 1.0)
    return out


@pytest.mark.parametrize("spec, overrides", [
    (TINY, []), (TINY, ["optim.decay_embeddings=False"]), (TINY, SIGLIP),
    ("experiments/vit_b16_mimic.py:runlocal", []),
], ids=["clip", "clip_no_embedding_decay", "siglip", "scanned_layers"])
def test_decay_mask_is_the_jax_optimizers(spec, overrides):
    config = load(spec, overrides)
    fmt, match = meta_match(config)
    flags = torch_baseline.decay_flags(match, config)
    assert flags == jax_mask_in_torch_names(config, fmt)
    for name, decayed in flags.items():
        if name.endswith("bias") or "norm" in name or name.startswith("logit_"):
            assert not decayed, name
        elif name.endswith("proj.weight") or ".fc" in name or "token_embedding" in name:
            assert decayed, name
    # Our class token and positions are [1, (n,) d] tensors: decayed unless told not to.
    embeddings = config.optim.decay_embeddings
    assert flags["vision_model.embeddings.position_embedding.weight"] is embeddings
    assert flags["text_model.embeddings.position_embedding.weight"] is embeddings
    if fmt == "clip":
        assert flags["vision_model.embeddings.class_embedding"] is embeddings


def test_optimizer_takes_the_jax_hyper_parameters():
    config = load(TINY)
    fmt = torch_baseline.check_supported(config)
    model = torch_baseline.build_hf_model(config, fmt, "cpu")
    flags = torch_baseline.decay_flags(torch_baseline.correspond(model, config, fmt), config)
    optimizer, _ = torch_baseline.make_optimizer(model, config, flags)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == config.optim.weight_decay and plain["weight_decay"] == 0
    assert decayed["lr"] == config.optim.learning_rate  # The peak; no base_batch_size here.
    assert decayed["betas"] == (config.optim.b1, config.optim.b2)
    assert decayed["eps"] == config.optim.eps
    assert len(decayed["params"]) == sum(flags.values())
    assert len(plain["params"]) == len(flags) - sum(flags.values())


def unit(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("loss", [
    dict(name="softmax"),
    dict(name="softmax", label_smoothing=0.1, i2t_weight=0.3, t2i_weight=0.7),
    dict(name="softmax", targets="multi_positive", multi_positive_key="text_id"),
    dict(name="sigmoid"),
    dict(name="sigmoid", label_smoothing=0.2),
])
def test_loss_is_the_jax_dense_loss(loss):
    import jax.numpy as jnp

    from jaxmedclip import losses

    rng = np.random.default_rng(0)
    image, text = unit(rng, (12, 16)), unit(rng, (12, 16))
    scale, bias = 9.5, -2.5
    spec = losses.LossSpec.from_config(dict(loss, impl="dense"))
    batch = {"text_id": jnp.arange(12)}  # Distinct ids, as the benchmark's batches.
    want, _ = losses.contrastive_loss(
        jnp.asarray(image), jnp.asarray(text), scale, bias, batch,
        config=spec, mesh=None, batch_axes=())
    got = torch_baseline.contrastive_loss(
        torch.from_numpy(image), torch.from_numpy(text), torch.tensor(scale),
        torch.tensor(bias), spec)
    assert abs(float(got) - float(want)) < 1e-5
    assert float(got) > 0


def test_twin_clamps_the_temperature_at_max_scale():
    from jaxmedclip import losses

    config = load(TINY, ["global_batch_size=4"])
    fmt = torch_baseline.check_supported(config)
    model = torch_baseline.build_hf_model(config, fmt, "cpu")
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    twin = torch_baseline.make_twin(model, config)
    pixels, ids, mask = torch_baseline.random_batch(config, "cpu")
    size = config.data.image_size
    assert pixels.shape == (4, 1, size, size) and bool(mask.all())
    assert int(ids.min()) >= 1 and int(ids.max()) < config.data.vocab_size
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        loss = twin(pixels, ids, mask)
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        norm = lambda x: x / x.norm(dim=-1, keepdim=True)
        want = torch_baseline.contrastive_loss(
            norm(image), norm(text), torch.tensor(config.model.max_scale), None,
            losses.LossSpec.from_config(config.loss))
    assert float(loss) == pytest.approx(float(want), abs=1e-5)


def run_main(tmp_path, capsys, *extra):
    out = tmp_path / "torch.json"
    result = torch_baseline.main([
        "--config", os.path.join(REPO, TINY), "--config.global_batch_size=8",
        "--steps", "2", "--warmup", "1", "--json", str(out), *extra])
    printed = capsys.readouterr().out.splitlines()
    return result, printed, json.loads(out.read_text())


def test_eager_run_reports_and_writes_its_json_line(tmp_path, capsys):
    result, printed, written = run_main(tmp_path, capsys)
    assert written == json.loads(printed[-1])
    assert written["impl"] == "torch_eager" and written["format"] == "clip"
    assert written["global_batch_size"] == 8 and written["num_params"] == 532_609
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["samples_per_s"] > 0 and result["step_time_median_s"] > 0
    assert result["samples_per_s"] == pytest.approx(8 / result["step_time_s"])
    assert result["tflops_per_device"] > 0
    assert result["mfu"] is None and result["peak_gib"] is None  # CPU.
    assert written["torch"] == torch.__version__
    assert written["transformers"] == transformers.__version__
    for key in ("devices", "compile_and_first_step_s", "step_time_s", "step_time_median_s",
                "samples_per_s", "tflops_per_device", "mfu", "peak_gib", "loss", "num_params"):
        assert any(line.startswith(f"{key}: ") for line in printed), key
    assert "mfu: na" in printed and "devices: 1 x cpu" in printed


@pytest.mark.slow  # Inductor compiles the step for about a minute on a CPU core.
def test_compiled_run_reports(tmp_path, capsys):
    result, _, written = run_main(tmp_path, capsys, "--compile")
    assert written["impl"] == "torch_compile"
    assert math.isfinite(result["loss"]) and result["samples_per_s"] > 0


def test_configs_the_twin_cannot_run_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="loss.multiview"):
        torch_baseline.check_supported(load("experiments/tiny_synthetic.py"))
    with pytest.raises(ValueError, match="microbatch_size=None"):
        torch_baseline.check_supported(load(TINY, ["microbatch_size=8"]))
