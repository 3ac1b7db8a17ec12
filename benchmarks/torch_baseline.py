"""The PyTorch twin of a config's train step, timed like benchmarks/train_step.py.

  python benchmarks/torch_baseline.py --config experiments/vit_b16_mimic.py \
      [--config.global_batch_size=256 ...] [--compile] [--steps 10] [--warmup 3] [--json FILE]

The model is the Hugging Face `transformers` class the export writes for the config
(`jaxmedclip.export.choose_format` and `hf_config`: CLIPModel, or SiglipModel), so it has
our widths, depths, heads, MLP sizes, text length, vocabulary, image and patch size and
one channel; its parameter count is checked against the JAX model's (`jax.eval_shape` of
the init, nothing allocated), the tensors one side has and the other lacks named
(`JAX_ONLY`, `HF_ONLY`). The step: the towers with SDPA attention under `torch.autocast`
in `config.model.dtype` on CUDA (float32 master weights; float32 throughout on CPU),
activation checkpointing per block when the config rematerialises (`model.remat`,
`model.remat_policy`), the `config.loss` loss (softmax with the learned temperature
clamped at `model.max_scale`, or sigmoid with its bias) in float32 over the whole global
batch on one device, gradient clipping at `optim.grad_clip_norm`, and AdamW (fused where
this torch has it) with the JAX optimizer's b1, b2, eps, weight decay and decay mask
(`jaxmedclip.optim.decays`, mapped onto the Hugging Face names through the export's
conversion tables). The learning rate is constant at the schedule's peak: the schedule
costs nothing, and a speed test need not follow it. `--compile` wraps towers and loss in
`torch.compile`.

The batch is random, of the config's shapes, as benchmarks/train_step.py makes it:
images [B, 1, S, S], token ids in [1, vocab) (no padding; the attention mask is
`tokens != PAD_ID`, as the exported tokenizer gives it; CLIP pools at the first EOS,
id 3, as our text tower does), every pair valid and only the diagonal positive (ids
all distinct, so `multi_positive` targets are one-hot). With a mask, transformers reads
it on the host each eager step to pick SDPA's causal kernel (one synchronisation); under
`torch.compile` it builds the mask tensor instead: both as the exported model runs.

Timing: build, then the first step (compiles with `--compile`) timed alone, `--warmup`
untimed steps, `--steps` steps with one synchronisation at the end (`step_time_s`, the
aggregate mean), then `--steps` more each synchronised (`step_time_median_s`). Printed
as `key: value` lines (devices, global_batch_size, compile_and_first_step_s,
step_time_s, step_time_median_s, samples_per_s, tflops_per_device and mfu from
`jaxmedclip.flops`, peak_gib from `torch.cuda.max_memory_allocated`, loss, num_params;
na where unknown, e.g. on CPU), then one JSON line with the same keys plus `impl`
(torch_eager | torch_compile), the torch and transformers versions and the settings;
`--json FILE` appends that line to FILE.

jax is imported only to count the JAX model's parameters and read the project's
optimizer rules (on the CPU backend: nothing is placed on the accelerator that torch
times); no tensorflow is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUPPORTED_FORMATS = ("clip", "siglip")
# Tensors of the JAX model with no counterpart in the Hugging Face class, per format.
JAX_ONLY = {
    "clip": {
        "image_tower/patch_embed/bias": "CLIP's patch embedding has no bias (the export folds "
        "ours into the positions)",
        "bias": "the sigmoid loss's logit bias (CLIPModel has none; the softmax loss ignores it)",
    },
    "siglip": {},
}
# Tensors of the Hugging Face class with no counterpart in ours, per format.
HF_ONLY = {
    "clip": {},
    "siglip": {
        "text_model.head.bias": "SigLIP's text head has a bias; our text projection has none "
        "(exported as 0)",
    },
}


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from jaxmedclip import config_lib  # Imports no jax.

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. experiments/x.py")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (twice: see above)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--compile", action="store_true", help="torch.compile towers and loss")
    parser.add_argument("--json", default=None, help="also write the JSON line to this file")
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, config_lib.override_flags(parser, rest)


def check_supported(config) -> str:
    """The export format of `config`'s model, once the twin is known to run its step."""
    from jaxmedclip import config_schema, export

    fmt = export.choose_format(config)
    optim = config_schema.complete_section("optim", config.optim)
    problems = []
    if fmt not in SUPPORTED_FORMATS:
        problems.append(f"the model exports as {fmt} ({export.HF_CLASSES[fmt]}); the twin "
                        f"builds {', '.join(SUPPORTED_FORMATS)} models")
    if config.loss.get("multiview") is not None:
        problems.append("loss.multiview (CXR-CLIP's multi-view terms) is not in the twin: "
                        "take a plain CLIP config, e.g. experiments/tiny_synthetic.py:runlocal")
    if config.loss.get("local") is not None:
        problems.append("loss.local (GLoRIA's local alignment) is not in the twin")
    if config.loss.targets == "soft_labels":
        problems.append("loss.targets='soft_labels' is not in the twin; one_hot and "
                        "multi_positive are (one-hot on the benchmark's distinct ids)")
    if config.microbatch_size is not None:
        problems.append(f"microbatch_size={config.microbatch_size} (GradCache) recomputes the "
                        "towers; the twin runs the whole batch at once: pass "
                        "--config.microbatch_size=None to both benchmarks")
    if optim["name"] != "adamw":
        problems.append(f"optim.name={optim['name']!r}: torch has no LAMB; use adamw")
    if optim["layer_decay"] is not None or optim["frozen"] or (
            optim["image_lr_mult"], optim["text_lr_mult"]) != (1.0, 1.0):
        problems.append("per-parameter learning rates (optim.layer_decay, image_lr_mult, "
                        "text_lr_mult, frozen) are not in the twin")
    if config.model.param_dtype != "float32":
        problems.append(f"model.param_dtype={config.model.param_dtype!r}: the twin keeps "
                        "float32 master weights")
    if problems:
        raise ValueError("the PyTorch twin cannot run this config:\n  " + "\n  ".join(problems))
    return fmt


# ----------------------------------------------------------------------------------------
# The model, its parameter count against ours, and the decay mask.


def build_hf_model(config, fmt: str, device: Any):
    """The export's Hugging Face model with SDPA attention, float32, on `device` ("meta":
    shapes only); temperature and bias at our initial values."""
    import torch
    import transformers

    from jaxmedclip import export

    hf_config = export.hf_config(config, fmt, config.model.temperature_init)
    model_class = getattr(transformers, export.HF_CLASSES[fmt])
    with torch.device(device):
        model = model_class._from_config(hf_config, attn_implementation="sdpa")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(config.model.temperature_init))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(config.model.bias_init)
    return model


def jax_param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Our parameters' names (one entry per layer, `a/b/c`) and shapes, from
    `jax.eval_shape` of the init with an abstract key (no device is touched)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxmedclip import batch_schema, models
    from jaxmedclip.convert import rules

    model = models.build_model(config.model, config.data)
    fields = batch_schema.batch_fields(config.data, 1)
    (image_shape, image_dtype), (token_shape, token_dtype) = fields["image"], fields["tokens"]

    def init(rng):
        return model.init(rng, jnp.zeros(image_shape, image_dtype),
                          jnp.zeros(token_shape, token_dtype))["params"]

    abstract = nn.unbox(jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32)))
    shapes = {name: tuple(x.shape) for name, x in rules.flatten(abstract).items()}
    return rules.unstacked_shapes(shapes)


class Correspondence(NamedTuple):
    """The torch model's parameters against ours: sizes, shapes and which of ours (per
    layer, `a/b/c`) each torch tensor is made of (several for a fused q, k, v tensor;
    none for `HF_ONLY` ones), through the export's conversion tables."""

    hf_sizes: dict[str, int]
    jax_shapes: dict[str, tuple[int, ...]]
    ours: dict[str, list[str]]


def correspond(model, config, fmt: str) -> Correspondence:
    from jaxmedclip import export
    from jaxmedclip.convert import layouts

    layout = export.layout(config, fmt)

    def ours_of(hf_name: str) -> list[str]:
        found = []
        for which, table, prefix in layout.towers:
            if not hf_name.startswith(prefix):
                continue
            rest, root = hf_name[len(prefix):], layouts.OUR_TOWERS[which] + "/"
            for rule in table.rules:
                for candidate in (rest, *(f"{rest}#{k}" for k in range(3))):
                    ours = rule.match_theirs(candidate)
                    if ours is not None:
                        found.append(root + ours)
        return found or [ours for rule in layout.heads if (ours := rule.match_theirs(hf_name))]

    sizes = {name: p.numel() for name, p in model.named_parameters()}
    return Correspondence(sizes, jax_param_shapes(config), {n: ours_of(n) for n in sizes})


def parameter_counts(match: Correspondence, fmt: str) -> dict[str, int]:
    """{num_params (torch), jax_num_params}; raises a ValueError naming every tensor that
    makes them differ beyond the declared `JAX_ONLY` / `HF_ONLY` ones."""
    from jaxmedclip import export

    ours = match.jax_shapes
    jax_total = sum(math.prod(shape) for shape in ours.values())
    hf_total = sum(match.hf_sizes.values())
    problems, matched = [], set()
    for name, size in match.hf_sizes.items():
        parts = match.ours[name]
        if not parts:
            if name not in HF_ONLY[fmt]:
                problems.append(f"torch {name} ({size}) has no JAX counterpart")
            continue
        missing = [p for p in parts if p not in ours]
        if missing:
            problems.append(f"torch {name} maps to {missing}, not in the JAX model")
            continue
        matched.update(parts)
        their_size = sum(math.prod(ours[p]) for p in parts)
        if their_size != size:
            problems.append(f"torch {name} has {size} numbers, JAX {parts} {their_size}")
    problems += [f"JAX {name} {shape} has no torch counterpart"
                 for name, shape in ours.items()
                 if name not in matched and name not in JAX_ONLY[fmt]]
    jax_only = {n: math.prod(ours[n]) for n in JAX_ONLY[fmt] if n in ours}
    hf_only = {n: match.hf_sizes[n] for n in HF_ONLY[fmt] if n in match.hf_sizes}
    expected = jax_total - sum(jax_only.values()) + sum(hf_only.values())
    if problems or expected != hf_total:
        accounted = ", ".join(
            [f"JAX-only {n} ({s}: {JAX_ONLY[fmt][n]})" for n, s in jax_only.items()]
            + [f"torch-only {n} ({s}: {HF_ONLY[fmt][n]})" for n, s in hf_only.items()]
        ) or "none"
        raise ValueError(
            f"the {export.HF_CLASSES[fmt]} twin has {hf_total} parameters, the JAX model "
            f"{jax_total} (expected {expected} after the accounted differences: {accounted})"
            + "".join(f"\n  {p}" for p in problems)
        )
    return {"num_params": hf_total, "jax_num_params": jax_total}


def decay_flags(match: Correspondence, config) -> dict[str, bool]:
    """torch parameter name -> whether the JAX optimizer decays it (`optim.decays` on our
    name and shape); `HF_ONLY` tensors (biases) are not decayed."""
    from jaxmedclip import config_schema, optim

    decay_embeddings = config_schema.complete_section("optim", config.optim)["decay_embeddings"]
    flags = {}
    for name, parts in match.ours.items():
        votes = {optim.decays(p.split("/"), len(match.jax_shapes[p]),
                              decay_embeddings=decay_embeddings) for p in parts} or {False}
        if len(votes) > 1:
            raise ValueError(f"torch {name} is made of {parts}, some decayed and some not")
        flags[name] = votes.pop()
    return flags


def make_optimizer(model, config, decays: Mapping[str, bool]):
    """(AdamW with the JAX optimizer's hyper-parameters and decay mask at the peak
    learning rate, "adamw_fused" | "adamw_foreach")."""
    import torch

    from jaxmedclip import config_schema, optim

    settings = config_schema.complete_section("optim", config.optim)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decays[n]], "weight_decay": settings["weight_decay"]},
        {"params": [p for n, p in named if not decays[n]], "weight_decay": 0.0},
    ]
    kwargs = dict(
        lr=optim.peak_learning_rate(settings, config.global_batch_size),
        betas=(settings["b1"], settings["b2"]),
        eps=settings["eps"],
    )
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), "adamw_fused"
    except (RuntimeError, ValueError) as e:
        print(f"note: fused AdamW is not available here ({e}); using foreach AdamW")
        return torch.optim.AdamW(groups, foreach=True, **kwargs), "adamw_foreach"


# ----------------------------------------------------------------------------------------
# The loss and the step.


def contrastive_loss(image_emb, text_emb, scale, bias, spec):
    """`config.loss` on L2-normalised [B, D] embeddings, float32, every pair valid and the
    diagonal the positives (jaxmedclip.losses' one-hot targets)."""
    import torch
    import torch.nn.functional as F

    if spec.matmul_inputs == "bfloat16":
        dots = (image_emb.bfloat16() @ text_emb.bfloat16().T).float()
    else:
        dots = image_emb.float() @ text_emb.float().T
    logits = scale * dots
    n, eps = logits.shape[0], spec.label_smoothing
    if spec.softmax:  # Label smoothing spreads eps over the N texts (images), as ours.
        labels = torch.arange(n, device=logits.device)
        i2t = F.cross_entropy(logits, labels, label_smoothing=eps)
        t2i = F.cross_entropy(logits.T, labels, label_smoothing=eps)
        return spec.i2t_weight * i2t + spec.t2i_weight * t2i
    targets = torch.eye(n, device=logits.device) * (1.0 - eps) + 0.5 * eps
    return F.binary_cross_entropy_with_logits(logits + bias, targets, reduction="sum") / n


def make_twin(model, config):
    """A torch module: (pixel_values, input_ids, attention_mask) -> the loss."""
    import torch
    import torch.nn.functional as F

    from jaxmedclip.losses.spec import LossSpec

    spec = LossSpec.from_config(config.loss)
    log_max_scale = math.log(config.model.max_scale)

    class ContrastiveTwin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf_model = model

        def forward(self, pixel_values, input_ids, attention_mask):
            image = self.hf_model.get_image_features(pixel_values=pixel_values).pooler_output
            text = self.hf_model.get_text_features(
                input_ids=input_ids, attention_mask=attention_mask).pooler_output
            with torch.autocast(pixel_values.device.type, enabled=False):
                image = F.normalize(image.float(), dim=-1, eps=1e-6)
                text = F.normalize(text.float(), dim=-1, eps=1e-6)
                scale = torch.clamp(self.hf_model.logit_scale, max=log_max_scale).exp()
                bias = getattr(self.hf_model, "logit_bias", None)
                return contrastive_loss(image, text, scale.reshape(()),
                                        None if bias is None else bias.reshape(()), spec)

    return ContrastiveTwin()


def random_batch(config, device: Any, seed: int = 0) -> tuple:
    """(pixel_values [B, 1, S, S], input_ids [B, L], attention_mask) of the config."""
    import numpy as np
    import torch

    from jaxmedclip.vocabulary import PAD_ID

    rng = np.random.default_rng(seed)
    b, size = config.global_batch_size, config.data.image_size
    channels = config.model.image.num_channels
    images = rng.normal(size=(b, channels, size, size)).astype(np.float32)
    tokens = rng.integers(1, config.data.vocab_size, (b, config.data.max_text_len))
    pixel_values = torch.from_numpy(images).to(device)
    input_ids = torch.from_numpy(tokens).to(device)
    return pixel_values, input_ids, (input_ids != PAD_ID).long()


def make_step(twin, optimizer, config, autocast_dtype) -> Callable[[tuple], Any]:
    import torch

    clip = config.optim.get("grad_clip_norm")
    params = [p for p in twin.parameters() if p.requires_grad]

    def step(batch):
        device = batch[0].device.type
        context = (torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
        with context:
            loss = twin(*batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, batch, args, sync: Callable[[], None]) -> dict[str, float]:
    start = time.perf_counter()
    loss = step(batch)  # Compiles with --compile.
    sync()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        loss = step(batch)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(batch)
    sync()
    mean = (time.perf_counter() - start) / args.steps
    each = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step(batch)
        sync()
        each.append(time.perf_counter() - start)
    return {"compile_s": first, "step_s": mean, "median_s": statistics.median(each),
            "loss": float(loss)}


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, REPO)
    args, overrides = parse_flags(sys.argv[1:] if argv is None else argv)
    import torch
    import transformers

    from jaxmedclip import config_lib, export, flops, models

    config = config_lib.config_from_flags(args.config, overrides)
    fmt = check_supported(config)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_hf_model(config, fmt, device)
    match = correspond(model, config, fmt)
    counts = parameter_counts(match, fmt)
    model.train()
    remat = models.remat_policy_of(config.model) != "none"
    if remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, optimizer_name = make_optimizer(model, config, decay_flags(match, config))
    twin = make_twin(model, config)
    if args.compile:
        twin = torch.compile(twin)
    # Our towers compute in model.dtype with float32 params: autocast, on CUDA only.
    dtype_name = config.model.dtype if cuda and config.model.dtype != "float32" else None
    autocast_dtype = getattr(torch, dtype_name) if dtype_name else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = time_steps(make_step(twin, optimizer, config, autocast_dtype),
                     random_batch(config, device, config.seed), args, sync)

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    step_s = run["step_s"]
    tflops = flops.train_flops_per_step(config) / 1e12 / step_s
    peak = flops.peak_tflops(device_name) if cuda else None
    result = {
        "devices": f"1 x {device_name}",
        "global_batch_size": config.global_batch_size,
        "compile_and_first_step_s": run["compile_s"],
        "step_time_s": step_s,
        "step_time_median_s": run["median_s"],
        "samples_per_s": config.global_batch_size / step_s,
        "tflops_per_device": tflops,
        "mfu": None if peak is None else tflops / peak,
        "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "loss": run["loss"],
        "num_params": counts["num_params"],
    }
    for key, value in result.items():
        shown = "na" if value is None else f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key}: {shown}")
    result.update(
        impl="torch_compile" if args.compile else "torch_eager",
        format=fmt,
        hf_class=export.HF_CLASSES[fmt],
        jax_num_params=counts["jax_num_params"],
        precision=f"{dtype_name} autocast, float32 weights" if dtype_name else "float32",
        attention="sdpa",
        optimizer=optimizer_name,
        learning_rate="constant at the peak",
        remat=remat,
        steps=args.steps,
        warmup=args.warmup,
        config=args.config,
        overrides=list(overrides),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    # jax only counts parameters: keep it off the accelerator (no memory preallocated there).
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
