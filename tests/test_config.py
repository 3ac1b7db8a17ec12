"""Config files, typed options, field overrides and the errors a user sees."""

import glob
import os

import pytest

from jaxmedclip import config_lib, config_schema, losses, train, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/tiny_synthetic.py"
VIT_B16 = "experiments/vit_b16_mimic.py"


def test_parse_arg_types_and_flags():
    opts = config_lib.parse_arg(
        "runlocal,steps=7,lr=0.5,name=x", runlocal=False, steps=1, lr=1.0, name="a"
    )
    assert opts.runlocal is True
    assert opts.steps == 7 and isinstance(opts.steps, int)
    assert opts.lr == 0.5 and isinstance(opts.lr, float)
    assert opts.name == "x"
    assert config_lib.parse_arg(None, steps=3).steps == 3


def test_parse_arg_unknown_key_names_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config option 'stpes'.*runlocal, steps"):
        config_lib.parse_arg("stpes=3", runlocal=False, steps=1)


def test_parse_arg_bad_value():
    with pytest.raises(ValueError, match="steps=.*'x'"):
        config_lib.parse_arg("steps=x", steps=1)
    with pytest.raises(ValueError, match="needs a value"):
        config_lib.parse_arg("steps", steps=1)


def test_load_config_with_arg():
    full = config_lib.load_config(TINY)
    local = config_lib.load_config(TINY + ":runlocal,total_steps=3")
    assert full.total_steps == 850 and full.global_batch_size == 64
    assert local.total_steps == 20  # runlocal shrinks everything, including steps.
    assert local.global_batch_size == 32
    # The default recipe is CXR-CLIP multi-view with normal studies as positives; runlocal
    # and recipe=clip are plain CLIP (2,000 steps).
    assert full.data.multiview and full.loss.multiview.image_image_weight == 1.0
    assert full.loss.multi_positive_key == "text_id,no_finding"
    assert not local.data.get("multiview", False) and local.loss.multi_positive_key == "text_id"
    clip = config_lib.load_config(TINY + ":recipe=clip")
    assert clip.total_steps == 2000 and not clip.data.get("multiview", False)
    assert config_lib.load_config(TINY + ":runlocal,recipe=cxrclip").data.multiview
    with pytest.raises(ValueError, match="recipe='simclr' is unknown"):
        config_lib.load_config(TINY + ":recipe=simclr")
    assert config_lib.load_config(TINY + ":loss_impl=dense").loss.impl == "dense"
    with pytest.raises(ValueError, match="unknown config option 'nope'"):
        config_lib.load_config(TINY + ":nope=1")


def test_load_config_missing_file():
    with pytest.raises(FileNotFoundError, match="does_not_exist.py"):
        config_lib.load_config("experiments/does_not_exist.py")


def test_overrides_keep_types_and_nest():
    config = config_lib.config_from_flags(
        TINY,
        [
            "total_steps=12",
            "optim.learning_rate=3e-4",
            "model.image.pool=mean",
            "data.synthetic.seed=5",
            "model.remat=true",
            "data.data_dir=/tmp/x",
        ],
    )
    assert config.total_steps == 12 and isinstance(config.total_steps, int)
    assert config.optim.learning_rate == pytest.approx(3e-4)
    assert config.model.image.pool == "mean"
    assert config.data.synthetic.seed == 5
    assert config.model.remat is True
    assert config.data.data_dir == "/tmp/x"


def test_override_unknown_field_names_valid_ones():
    with pytest.raises(KeyError, match=r"model.image has fields .*patch_size.*pool"):
        config_lib.config_from_flags(TINY, ["model.image.poool=mean"])
    with pytest.raises(KeyError, match=r"<top level> has fields .*global_batch_size"):
        config_lib.config_from_flags(TINY, ["global_bs=3"])


def test_override_wrong_type():
    with pytest.raises(ValueError, match="total_steps"):
        config_lib.config_from_flags(TINY, ["total_steps=many"])
    with pytest.raises(ValueError, match="is a group"):
        config_lib.config_from_flags(TINY, ["model=3"])


def test_parse_flags_collects_overrides():
    args, overrides = train.parse_flags(
        ["--config", TINY + ":runlocal", "--workdir", "/tmp/w", "--config.total_steps=4"]
    )
    assert args.config == TINY + ":runlocal" and args.workdir == "/tmp/w"
    assert overrides == ["total_steps=4"]
    with pytest.raises(SystemExit):
        train.parse_flags(["--config", TINY, "--workdir", "/tmp/w", "--steps=4"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "global_batch_size=100",
            r"global_batch_size 100 is not divisible by the 8 devices .* e.g. 96 would fit",
        ),
        (
            "model.image.name=resnet",
            r"model.image.name='resnet' is unknown; choose one of \['vit'\]",
        ),
        ("data.image_size=60", r"data.image_size=60 is not divisible by model.image.patch_size=8"),
        ("mesh.fsdp=3", r"mesh=.* the fixed axes use 3 devices, which does not divide the 8"),
        ("loss.impl=carrier_pigeon", r"loss.impl='carrier_pigeon'"),
        ("optim.schedule=wavy", r"optim.schedule='wavy' is unknown"),
        ("total_steps=0", r"total_steps=0 must be a positive integer"),
    ],
)
def test_bad_config_stops_before_work(override, message, tmp_path, capsys):
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit, match=message):
        train.main(
            ["--config", TINY + ":runlocal", "--workdir", str(workdir), f"--config.{override}"]
        )
    assert not workdir.exists()  # Nothing was built or written.


@pytest.mark.parametrize(
    "spec",
    sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
    + [os.path.join(REPO, "experiments", "tiny_synthetic.py:runlocal,recipe=cxrclip")],
)
def test_every_experiment_passes_the_config_checks(spec):
    """Each shipped experiment, as its default options build it, is a config the trainer
    accepts (the checks run before any data is built)."""
    config = config_lib.load_config(spec)
    training.check_config(config)
    assert config_schema.complete(config).to_dict() == config.to_dict()  # Idempotent.


def write_experiment(tmp_path, edit):
    """An experiment file: the tiny runlocal config with `edit` (Python lines) applied."""
    path = tmp_path / "typo.py"
    path.write_text(
        "from jaxmedclip import config_lib\n"
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        f"    config = config_lib.load_config({os.path.join(REPO, TINY)!r} + ':runlocal')\n"
        f"    {edit}\n"
        "    return config\n")
    return str(path)


@pytest.mark.parametrize("edit, message", [
    ("config.loss.tile_sise = 256", r"loss.tile_sise is not a config field; loss has .*tile_size"),
    ("config.data.augment = ml_collections.ConfigDict(dict(rotaton=5.0))",
     r"data.augment.rotaton is not a config field; data.augment has .*rotation_degrees"),
    ("config.model.text.widht = 64", r"model.text.widht is not a config field"),
    ("config.optim.lr = 1e-3", r"optim.lr is not a config field; optim has .*learning_rate"),
    ("config.totl_steps = 5", r"totl_steps is not a config field; the top level has"),
    ("config.eval.every_step = 5", r"unknown field eval.every_step"),
    ("config.loss.local = ml_collections.ConfigDict(dict(wieght=1.0))",
     r"loss.local.wieght is not a config field"),
])
def test_an_undeclared_key_anywhere_is_refused_with_the_valid_ones(tmp_path, edit, message):
    spec = write_experiment(tmp_path, edit)
    with pytest.raises((ValueError, KeyError), match=message):
        config_lib.config_from_flags(spec, [])
    with pytest.raises(SystemExit, match=message):  # And through the command line.
        train.main(["--config", spec, "--workdir", str(tmp_path / "w"), "--compile_only"])
    assert not (tmp_path / "w").exists()


def test_declared_groups_match_the_code_that_reads_them():
    """The schema names exactly the fields each section's reader declares."""
    import dataclasses

    from input_pipeline.augment import AugmentConfig
    from input_pipeline.label_prompts import DecoupledData
    from input_pipeline.synthetic_builder import SyntheticCxrConfig
    from jaxmedclip import losses, optim
    from jaxmedclip.methods import local_alignment, multiview

    names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    assert set(config_schema.LOSS) == names(losses.LossSpec)
    assert set(config_schema.AUGMENT) == names(AugmentConfig)
    assert set(config_schema.DECOUPLED) == names(DecoupledData)
    assert set(config_schema.MULTIVIEW) == names(multiview.MultiviewSpec)
    assert set(config_schema.SYNTHETIC) <= names(SyntheticCxrConfig)
    with pytest.raises(ValueError, match="loss.local has (.*)") as error:
        local_alignment.local_alignment_config({"not_a_field": 1})
    assert set(config_schema.LOCAL) == set(error.value.args[0].split(" has ")[1].split(", "))
    lr_mults = {f"{tower}_lr_mult" for tower in optim.TOWER_PARAMS}
    assert lr_mults <= set(config_schema.FIELDS["optim"])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    config = config_lib.load_config(TINY + ":runlocal")
    training.check_tokenizer_fits(config, config.data.vocab_size)
    with pytest.raises(ValueError, match=r"the tokenizer has 513 pieces but data.vocab_size="
                                         r"512; raise data.vocab_size"):
        training.check_tokenizer_fits(config, 513)
    gloria = config_lib.load_config("experiments/gloria_synthetic.py:runlocal")
    with pytest.raises(ValueError, match=r"raise data.vocab_size"):
        training.word_starts_of(gloria, ["\u2581a"] * (gloria.data.vocab_size + 1))


def test_every_declared_field_is_filled_so_any_can_be_overridden(tmp_path):
    """Fields an experiment file leaves out take their declared defaults at load, so a
    --config override reaches them too."""
    config = config_lib.load_config(TINY + ":runlocal")
    assert config.loss.label_smoothing == 0.0 and config.optim.cooldown_steps == 0
    assert config.model.text.layout == "pre_ln" and config.loss.local is None
    overridden = config_lib.config_from_flags(
        TINY + ":runlocal", ["loss.label_smoothing=0.1", "optim.cooldown_steps=3",
                             "loss.impl=ring", "loss.tile_size=8", "optim.b1=1"])
    assert overridden.loss.label_smoothing == 0.1 and overridden.optim.cooldown_steps == 3
    assert overridden.optim.b1 == 1.0 and isinstance(overridden.optim.b1, float)
    assert losses.LossSpec.from_config(overridden.loss).tile_size == 8
    with pytest.raises(ValueError, match="loss.local is off"):
        config_lib.config_from_flags(TINY + ":runlocal", ["loss.local.weight=1"])


@pytest.mark.parametrize("edit, message", [
    ("config.loss.impl = 'rng'", r"loss.impl='rng' is unknown; choose one of "
                                 r"\['dense', 'all_gather', 'ring'\]"),
    ("config.loss.tile_size = 'big'", r"loss.tile_size='big' must be int, not str"),
    ("config.model.remat = 1", r"model.remat=1 must be bool, not int"),
    ("config.optim.learning_rate = None", r"optim.learning_rate is None; it needs a value"),
    ("config = ml_collections.ConfigDict(dict(data=dict(name='synthetic_cxr')))",
     r"total_steps is required"),
    ("config.data.decoupled = ml_collections.ConfigDict(dict(image_only_fraction=0.1))",
     r"data.decoupled.image_only_fraction is now called label_prompt_fraction"),
    ("config.model.image.pool = 'gap'", r"model.image.pool='gap' is unknown"),
])
def test_a_bad_value_is_refused_at_load_naming_field_and_what_fits(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        config_lib.config_from_flags(write_experiment(tmp_path, edit), [])


def test_declared_choices_are_the_ones_the_code_implements():
    from jaxmedclip import models, optim
    from jaxmedclip.models import layers, text, vit

    assert set(config_schema.DTYPES) == set(models.DTYPES)
    assert config_schema.FIELDS["model"]["image"]["name"].choices == tuple(models.IMAGE_TOWERS)
    assert config_schema.FIELDS["model"]["text"]["name"].choices == tuple(models.TEXT_TOWERS)
    assert config_schema.FIELDS["model"]["name"].choices == tuple(models.MODELS)
    assert vit.POOLS == config_schema.IMAGE_POOLS and text.LAYOUTS == config_schema.TEXT_LAYOUTS
    assert layers.ATTENTION_IMPLS == config_schema.ATTENTION_IMPLS
    assert optim.SCHEDULES == config_schema.SCHEDULES
