"""Issue #21: the export as a user runs it, on a checkpoint of a real (short) training run.

- `python -m jaxmedclip.export` in a fresh process never imports tensorflow (in one
  process, tensorflow followed by the triton that the CUDA build of torch loads crashes);
  training with `init_from` never imports torch, transformers or triton;
- the README's five-line PyTorch example runs on the exported folder;
- a failed export leaves no folder a loader accepts, and never half-overwrites one.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from pytorch_side import import_torch_and_transformers  # noqa: E402

torch, transformers = import_torch_and_transformers()

from input_pipeline.tokenizer import Tokenizer  # noqa: E402
from jaxmedclip import config_lib, evaluate, export, models  # noqa: E402
from jaxmedclip.convert import parity  # noqa: E402
from jaxmedclip.convert.tokenizer import vocabulary_signature  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, PATCH, WIDTH, HEADS = 32, 8, 32, 2

# Runs a module as `python -m` would, in a process where importing any of the blocked
# packages raises (with the traceback of whoever imported it); prints which of them
# ended up loaded anyway. Probing (`importlib.util.find_spec`) still finds them, as
# where they are installed: only loading one fails.
GUARDED_RUN = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, runpy, sys

    blocked, module = set(json.loads(sys.argv[1])), sys.argv[2]

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"import of {spec.name} blocked (issue #21)", name=spec.name)

        def exec_module(self, module):
            pass

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                return importlib.util.spec_from_loader(name, Refuse())
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = [module, *sys.argv[3:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        print("LOADED_BLOCKED=" + json.dumps(sorted(m for m in blocked if m in sys.modules)))
    """
)


def run_guarded(module, args, blocked, timeout=600):
    """(return code, stdout + stderr, blocked packages that were loaded)."""
    result = subprocess.run(
        [sys.executable, "-c", GUARDED_RUN, json.dumps(sorted(blocked)), module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    found = re.findall(r"^LOADED_BLOCKED=(.*)$", result.stdout, re.MULTILINE)
    return result.returncode, output, json.loads(found[-1]) if found else None


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    """A Hugging Face CLIP vision tower shaped like the test model's (for init_from)."""
    folder = str(tmp_path_factory.mktemp("hf_vision"))
    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
        num_channels=1,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, hf_vision):
    """The tiny runlocal config, smaller still, starting its image tower from `hf_vision`."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    path = tmp_path_factory.mktemp("experiments") / "export_run.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import ml_collections

            from jaxmedclip import config_lib

            def get_config(arg=None):
                c = config_lib.load_config("experiments/tiny_synthetic.py:runlocal")
                c.total_steps, c.global_batch_size, c.log_every = 2, 16, 1
                c.optim.warmup_steps = 1
                c.data.data_dir = {data_dir!r}
                c.data.synthetic.update(dict(num_train=96, num_validation=32, num_test=32,
                                             source_image_size=64))
                c.data.image_size, c.data.max_text_len, c.data.vocab_size = {SIZE}, 24, 128
                c.model.embed_dim = 24
                c.model.image.update(dict(patch_size={PATCH}, width={WIDTH}, depth=1,
                                          num_heads={HEADS}))
                c.model.text.update(dict(width={WIDTH}, depth=1, num_heads={HEADS}))
                c.init_from = ml_collections.ConfigDict(
                    dict(path={hf_vision!r}, towers=("image",)))
                return c
            """
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def trained(experiment, tmp_path_factory):
    """`python -m jaxmedclip.train` (2 steps, init_from) in a process without torch,
    transformers or triton: (workdir, output, blocked packages loaded)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    rc, output, loaded = run_guarded(
        "jaxmedclip.train",
        ["--config", experiment, "--workdir", workdir],
        blocked={"torch", "transformers", "triton"},
    )
    assert rc == 0, output[-6000:]
    return workdir, output, loaded


@pytest.fixture(scope="module")
def exported(experiment, trained, tmp_path_factory):
    """`python -m jaxmedclip.export` (as the README runs it) in a process where importing
    tensorflow raises: (folder, output, blocked packages loaded)."""
    workdir = trained[0]
    out = str(tmp_path_factory.mktemp("models") / "cxr_clip")
    rc, output, loaded = run_guarded(
        "jaxmedclip.export",
        ["--config", experiment, "--workdir", workdir, "--out", out],
        blocked={"tensorflow", "tensorflow_datasets"},
    )
    assert rc == 0, output[-6000:]
    return out, output, loaded


def test_training_with_init_from_imports_no_torch(trained, experiment):
    workdir, output, loaded = trained
    assert loaded == []
    assert "initialised the image tower(s) from" in output
    # The run recorded its tokenizer, the data config's, for the export.
    config = config_lib.load_config(experiment)
    data_dir = config.data.data_dir
    spm_name = f"spm_{config.data.tokenizer_type}_{config.data.vocab_size}.model"
    source = [
        os.path.join(d, spm_name)
        for d, _, files in os.walk(data_dir)
        if spm_name in files and d.endswith("tokenizer")
    ]
    assert len(source) == 1
    with open(os.path.join(workdir, "tokenizer.model"), "rb") as a, open(source[0], "rb") as b:
        assert vocabulary_signature(a.read()) == vocabulary_signature(b.read())


def test_export_cli_imports_no_tensorflow_and_loads(exported, trained, experiment):
    out, output, loaded = exported
    assert loaded == []
    assert "self-check: CLIPModel vs JAX" in output and "token ids identical" in output
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]
    # Every file as readable as the others (safetensors writes its file with mode 0600).
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
    assert len(set(modes.values())) == 1, modes

    # Independently of the export's own check: the folder computes the checkpoint's model.
    config = config_lib.load_config(experiment)
    params, step = evaluate.restore_params(evaluate.model_setup(config), trained[0], None)
    assert step == 2
    model = models.build_model(config.model, config.data)
    hf_model = transformers.AutoModel.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert type(hf_model).__name__ == "CLIPModel"
    reports = ["Heart size is normal. No pleural effusion.", "Small left pneumothorax." * 9]
    ours = Tokenizer(os.path.join(trained[0], "tokenizer.model"), 24).encode_batch(reports)
    text = hf_tokenizer(reports, padding="max_length", truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(text["input_ids"].numpy(), ours)
    images = np.random.default_rng(3).integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)
    pixels = processor([Image.fromarray(im) for im in images], return_tensors="pt")
    with torch.no_grad():
        output = hf_model(**text, pixel_values=pixels["pixel_values"])
    x = (images[..., None] / 255.0 - config.data.image_mean) / config.data.image_std
    variables = {"params": params}
    image_emb = model.apply(variables, x.astype(np.float32), method=model.encode_image)
    text_emb = model.apply(variables, ours, method=model.encode_text)
    np.testing.assert_allclose(output.image_embeds.numpy(), image_emb, rtol=0, atol=1e-5)
    np.testing.assert_allclose(output.text_embeds.numpy(), text_emb, rtol=0, atol=1e-5)


def readme_pytorch_section() -> tuple[str, str]:
    """(the export's --out, the Python block) of README.md's "Use the model from PyTorch"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Use the model from PyTorch", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert commands and blocks, "README.md's PyTorch section lost its export command or example"
    assert "python -m jaxmedclip.export" in commands[0]
    return re.search(r"--out (\S+)", commands[0]).group(1), blocks[0]


def test_readme_pytorch_example_runs_on_the_export(exported, tmp_path):
    out = exported[0]
    folder, code = readme_pytorch_section()
    assert len(code.strip().splitlines()) == 5 and f'"{folder}"' in code  # The export's.
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "cxr.png")
    code = code.replace(f'"{folder}"', repr(out))
    check = "import json; print('PROBS=' + json.dumps(probs.tolist()))\n"
    result = subprocess.run(
        [sys.executable, "-c", code + check],
        cwd=tmp_path,  # The example opens "cxr.png".
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    probs = np.asarray(json.loads(re.search(r"^PROBS=(.*)$", result.stdout, re.M).group(1)))
    assert probs.shape == (1, 2) and np.all(probs > 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def _args(experiment, workdir, out, *more):
    return ["--config", experiment, "--workdir", workdir, "--out", out, *more]


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def _hidden(folder):
    return [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".")]


def test_existing_folder_is_refused_before_any_work(exported, experiment, tmp_path):
    out = exported[0]
    before = _files(out)
    # The workdir does not exist: the refusal must come before the restore.
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.main(_args(experiment, str(tmp_path / "no_run"), out))
    assert _files(out) == before


def test_old_workdir_without_tokenizer_names_the_flag(trained, experiment, tmp_path):
    config = config_lib.load_config(experiment)
    with pytest.raises(FileNotFoundError) as error:
        export.find_tokenizer(str(tmp_path), config)
    message = str(error.value)
    assert "--tokenizer" in message and "spm_bpe_128.model" in message
    assert config.data.data_dir in message  # The model that training used is listed.


def test_failed_export_leaves_no_folder(trained, experiment, tmp_path, monkeypatch):
    """A conversion bug (one tensor off) fails the self-check: nothing at --out."""
    original = export.hf_state_dict

    def one_tensor_off(params, config, fmt):
        tensors = original(params, config, fmt)
        weight = tensors["text_projection.weight"]
        noise = np.random.default_rng(0).normal(0, 0.01, weight.shape).astype(weight.dtype)
        return {**tensors, "text_projection.weight": weight + noise}

    monkeypatch.setattr(export, "hf_state_dict", one_tensor_off)
    out = str(tmp_path / "models" / "cxr_clip")
    with pytest.raises(export.ExportError, match="text_embeds difference") as error:
        export.main(_args(experiment, trained[0], out))
    assert "nothing was written" in str(error.value)
    assert not os.path.exists(out) and _hidden(out) == []
    with pytest.raises(OSError):  # No folder a loader would accept.
        transformers.AutoTokenizer.from_pretrained(out)


def test_overwrite_replaces_only_after_success(
    exported, trained, experiment, tmp_path, monkeypatch
):
    out = str(tmp_path / "cxr_clip")
    os.makedirs(out)
    for name, content in _files(exported[0]).items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(content)
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("from an older export")
    before = _files(out)

    # Fails mid-way (weights and tokenizer.json written, then the disk is full).
    from jaxmedclip.convert import tokenizer as convert_tokenizer

    def disk_full(model_path, max_len, folder, allow_inexact=False):
        convert_tokenizer.build_tokenizer(model_path).save(os.path.join(folder, "tokenizer.json"))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(export, "save_tokenizer", disk_full)
        with pytest.raises(OSError, match="No space left"):
            export.main(_args(experiment, trained[0], out, "--overwrite"))
    assert _files(out) == before and _hidden(out) == []

    # Succeeds: the old folder is replaced as a whole.
    export.main(_args(experiment, trained[0], out, "--overwrite"))
    after = _files(out)
    assert "stale.txt" not in after and _hidden(out) == []
    assert after["model.safetensors"] == before["model.safetensors"]  # Same checkpoint.
    assert set(after) == set(before) - {"stale.txt"}


def test_parity_report_flags_differences():
    within = dict(hf_class="CLIPModel", num_images=3, num_texts=4, scale=20.0, atol=1e-4)
    good = parity.ParityReport(
        image_embeds=2e-7, text_embeds=9e-5, logits=1.5e-3, token_ids_equal=True, **within
    )
    assert good.problems() == []  # Logits may differ by 1e-4 x the scale 20.
    bad = parity.ParityReport(
        image_embeds=float("nan"), text_embeds=3e-4, logits=5e-3, token_ids_equal=False, **within
    )
    problems = bad.problems()
    assert len(problems) == 4
    assert "token ids differ" in problems[0]
    assert "image_embeds" in problems[1] and "text_embeds" in problems[2]
    assert "logits" in problems[3] and "0.002" in problems[3]
