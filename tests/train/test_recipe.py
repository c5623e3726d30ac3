import pytest
import yaml

from modalign.core.errors import ConfigError
from modalign.train.recipe import dump_recipe, load_recipe, packaged_recipes, validate_recipe


@pytest.mark.parametrize("name", sorted(packaged_recipes()))
def test_packaged_recipes_validate_and_round_trip(name):
    recipe = load_recipe(name)
    again = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert dump_recipe(again) == dump_recipe(recipe)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.epoch=3", r"train\.epoch: unknown key \(did you mean 'epochs'\?\); allowed: .*batch_size"),
        ("train.epochs=many", r"train\.epochs: .*valid integer"),
        ("train.precision=fp8", r"train\.precision: .*allowed: fp32, bf16"),
        (
            "model.encoders.image.name=image_cnm",
            r"model\.encoders\.image\.name: unknown encoder 'image_cnm' \(did you mean 'image_cnn'",
        ),
        ("model.encoders.image.widths=wide", r"model\.encoders\.image\.widths: invalid value 'wide'"),
        ("model.encoders.image.in_channels=3", r"model\.encoders\.image\.in_channels: unknown argument"),
        ("data.name=av-digit", r"data\.name: unknown dataset 'av-digit' \(did you mean 'av-digits'"),
        ("method.name=clap", r"method\.name: unknown method 'clap' \(did you mean 'clip'"),
        ("method.temprature=0.1", r"method\.temprature: unknown argument of method 'clip' \(did you mean 'temp"),
        ("model.frozen=[video]", r"model\.frozen: no encoder for \['video'\]"),
        ("eval.unknown=1", r"eval\.unknown: unknown key"),
    ],
)
def test_bad_config_names_key_and_allowed_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_recipe("av-digits-clip", [override])


def test_unknown_recipe_name_suggests():
    with pytest.raises(ConfigError, match=r"unknown recipe 'av-digits-clp' \(did you mean 'av-digits-clip'"):
        load_recipe("av-digits-clp")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_apply():
    recipe = load_recipe("av-digits-clip", ["train.epochs=3", "train.lr=1e-4", "model.embed_dim=64"])
    assert recipe.train.epochs == 3 and recipe.train.lr == pytest.approx(1e-4) and recipe.model.embed_dim == 64
