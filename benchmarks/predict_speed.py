"""Speed of `python -m jaxmedclip.predict`'s path on synthetic PNG files, in images/s.

    python benchmarks/predict_speed.py [--config experiments/tiny_synthetic.py[:arg]]
        [--workdir W [--checkpoint STEP]] [--num_images 1000] [--size 512] [--rounds 2]
        [--cpu_devices 8] [--config.field=value ...]

Writes `--num_images` 8-bit grayscale PNGs of `--size`² (a smooth random field plus noise,
so that they compress like radiographs rather than like noise or flat fields) to a
temporary folder, then times what the entry point does with them:

- setup: the model's mesh and parameters (restored from `--workdir`, or without it a
  freshly initialised model of the config: the same shapes and work, so the same speed,
  with meaningless probabilities), the tokenizer (`<workdir>/tokenizer.model`, or without
  a workdir one trained on the prompts) and the prompt embeddings;
- predict, `--rounds` times: read (`images.load_image` / `resize_max_side`), preprocess
  (`pixels_preprocess`: evaluation's preprocessing), embed sharded over the mesh, score,
  and write the CSV. The first round includes compiling the embedding step, as a single
  CLI run does.

Last line: `images_per_s=<first round>` and the total seconds for setup plus that round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pngs(folder: str, count: int, size: int, seed: int = 0) -> list[str]:
    """`count` 8-bit grayscale PNGs of `size`²: low-frequency structure plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, size)
    paths = []
    for i in range(count):
        fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
        field = np.sin(2 * np.pi * fx * grid[None, :] + phase) * np.cos(
            2 * np.pi * fy * grid[:, None]
        )
        pixels = 128 + 60 * field + rng.normal(0, 8, (size, size))
        path = os.path.join(folder, f"image_{i:05d}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def fresh_params(setup, data_config):
    """A freshly initialised model of `setup`, built sharded (`jax.jit` with the
    parameters' shardings: never whole on one device first)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxmedclip import training

    images, tokens = training.dummy_inputs(data_config)

    def init(rng):
        variables = setup.model.init(
            rng, jnp.zeros(images.shape, images.dtype), jnp.zeros(tokens.shape, tokens.dtype)
        )
        return nn.unbox(variables["params"])

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        return jax.jit(init, out_shardings=setup.param_shardings)(jax.random.key(0))


def prompt_tokenizer(config, folder: str):
    """A SentencePiece model trained on the config's prompts (no workdir to take one from)."""
    from input_pipeline.tokenizer import Tokenizer, train_sentencepiece
    from jaxmedclip import evaluation

    cfg = evaluation.eval_config(config)
    sets = evaluation.prompts.prompt_sets(cfg.zero_shot_findings, cfg.prompts)
    texts = [p for s in sets.values() for p in (*s.positive, *s.negative)]
    model = train_sentencepiece(
        texts, os.path.join(folder, "prompts_spm"), config.data.vocab_size,
        config.data.tokenizer_type,
    )
    return Tokenizer(model, config.data.max_text_len)


def main(argv=None) -> None:
    sys.path.insert(0, REPO)
    from jaxmedclip import config_lib  # Imports no jax: XLA_FLAGS can still be set after.

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=os.path.join(REPO, "experiments", "tiny_synthetic.py"))
    parser.add_argument("--workdir", default=None, help="default: a freshly initialised model")
    parser.add_argument("--checkpoint", type=int, default=None)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="side of the PNGs written")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--cpu_devices", type=int, default=8, help="fake CPU devices (sets XLA_FLAGS; 0: leave)"
    )
    args, rest = parser.parse_known_args(argv)
    overrides = config_lib.override_flags(parser, rest)
    if args.num_images < 1 or args.rounds < 1:
        parser.error("--num_images and --rounds must be >= 1")
    if args.cpu_devices:
        config_lib.add_cpu_devices(args.cpu_devices)
    import jax

    from jaxmedclip import evaluate, predict

    config = config_lib.config_from_flags(args.config, overrides)
    with tempfile.TemporaryDirectory(prefix="predict_speed_") as scratch:
        start = time.perf_counter()
        paths = write_pngs(scratch, args.num_images, args.size)
        print(f"wrote {len(paths)} PNGs of {args.size}x{args.size} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)

        start = time.perf_counter()
        if args.workdir:
            loaded = predict.load_model(config, args.workdir, args.checkpoint)
            setup, params, tokenizer = loaded.setup, loaded.params, loaded.tokenizer
            model = loaded.name
        else:
            setup = evaluate.model_setup(config)
            params = fresh_params(setup, config.data)
            tokenizer = prompt_tokenizer(config, scratch)
            model = "a freshly initialised model"
        predictor = predict.Predictor(config, setup, params, tokenizer)
        setup_s = time.perf_counter() - start
        devices = jax.devices()
        print(f"setup {setup_s:.1f} s: {model}, {len(devices)} {devices[0].platform} devices, "
              f"eval.batch_size {predictor.batch_size}", flush=True)

        out = os.path.join(scratch, "predictions.csv")
        rates = []
        for round_ in range(args.rounds):
            start = time.perf_counter()
            result = predictor.predict(paths)
            predict.write_csv(out, paths, result, predictor.head.findings, None)
            seconds = time.perf_counter() - start
            failed = sum(bool(e) for e in result.errors)
            if failed:
                raise RuntimeError(f"{failed} images failed: {result.errors[:3]}")
            rates.append(len(paths) / seconds)
            print(f"round {round_ + 1}: {len(paths)} images in {seconds:.1f} s "
                  f"({rates[-1]:.1f} images/s)", flush=True)
    first = len(paths) / rates[0]
    print(f"images_per_s={rates[0]:.1f} (first round, compile included; best "
          f"{max(rates):.1f}) total_s={setup_s + first:.1f} (setup + first round)")


if __name__ == "__main__":
    main()
