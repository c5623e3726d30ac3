"""Method contracts: composition from the recipe, features apart from the loss, observed rows only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.methods import Method, MultimodalModel
from modalign.objectives import InfoNCE, SigmoidLoss, infonce_loss
from modalign.train.build import build_method
from modalign.train.recipe import expand_method, validate_recipe

SPECS = {"image": ModalitySpec("image", channels=1, size=8), "audio": ModalitySpec("audio", channels=6)}


def recipe_tree(method: dict) -> dict:
    return {
        "data": {"name": "av-digits"},
        "model": {
            "embed_dim": 8,
            "encoders": {"image": {"name": "image_cnn", "widths": [4], "dim": 8}, "audio": {"name": "audio_tdnn"}},
        },
        "method": method,
    }


def make_batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        data={"image": torch.randn(n, 1, 8, 8, generator=g), "audio": torch.randn(n, 6, 10, generator=g)},
        present={"image": torch.ones(n, dtype=torch.bool), "audio": torch.ones(n, dtype=torch.bool)},
        ids=torch.arange(n),
        padding={"audio": torch.zeros(n, 10, dtype=torch.bool)},
    )


def build(method: dict, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    return build_method(validate_recipe(recipe_tree(method)), SPECS)


def test_composite_weights_sum_and_every_part_is_named() -> None:
    method = build(
        {
            "name": "composite",
            "objectives": [
                {"name": "infonce", "weight": 0.5, "temperature": 0.1},
                {"name": "infonce", "weight": 2.0, "temperature": 0.5, "label": "warm"},
                {"name": "sigmoid", "weight": 1.0},
            ],
        }
    )
    batch = make_batch()
    outputs = method(batch)
    out = method.loss(outputs, batch)
    assert set(out.parts) == {"infonce", "warm", "sigmoid"}
    want = 0.5 * out.parts["infonce"] + 2.0 * out.parts["warm"] + out.parts["sigmoid"]
    torch.testing.assert_close(out.loss, want)
    a, b = outputs.embeddings["audio"], outputs.embeddings["image"]
    torch.testing.assert_close(out.parts["warm"], infonce_loss(a, b, torch.tensor(math.log(2.0))))
    assert out.metrics["warm/temperature"] == pytest.approx(0.5)
    assert out.metrics["infonce/temperature"] == pytest.approx(0.1)


def test_duplicate_objectives_get_distinct_labels() -> None:
    specs = expand_method(
        {
            "name": "composite",
            "objectives": [
                {"name": "infonce", "modalities": ["audio", "image"]},
                {"name": "infonce", "modalities": ["image", "audio"]},
            ],
        }
    )
    assert [s.label for s in specs] == ["infonce_audio-image", "infonce_image-audio"]
    specs = expand_method({"name": "composite", "objectives": [{"name": "sigmoid"}, {"name": "sigmoid"}]})
    assert [s.label for s in specs] == ["sigmoid_0", "sigmoid_1"]


def test_loss_parameters_live_in_their_objective() -> None:
    method = build({"name": "siglip", "temperature": 0.2, "bias": -4.0})
    names = {n for n, _ in method.named_parameters()}
    assert "objectives.sigmoid.logit_bias" in names and "objectives.sigmoid.scale.logit_scale" in names
    assert not any("logit" in n for n, _ in method.model.named_parameters())
    assert {"objectives.sigmoid.logit_bias", "objectives.sigmoid.scale.logit_scale"} <= method.no_weight_decay()


def test_clip_preset_is_the_composite_of_one_infonce() -> None:
    preset = build({"name": "clip", "temperature": 0.05}, seed=3)
    composite = build({"name": "composite", "objectives": [{"name": "infonce", "temperature": 0.05}]}, seed=3)
    batch = make_batch(seed=1)
    torch.testing.assert_close(preset.training_step(batch).loss, composite.training_step(batch).loss)
    assert isinstance(preset.objectives["infonce"], InfoNCE)


@pytest.mark.parametrize(
    ("method", "pattern"),
    [
        ({"name": "composite", "objectives": []}, r"method\.objectives: a composite method needs"),
        ({"name": "composite", "objectives": [{"name": "infonse"}]}, r"method\.objectives\.0\.name: unknown objective"),
        (
            {"name": "composite", "objectives": [{"name": "infonce"}, {"name": "sigmoid", "temprature": 1}]},
            r"method\.objectives\.1\.temprature: unknown argument.*did you mean 'temperature'",
        ),
        ({"name": "composite", "objectives": [{"name": "infonce", "weight": -1}]}, r"objectives\.0\.weight: must be"),
        (
            {"name": "composite", "objectives": [{"name": "infonce", "label": "x"}, {"name": "sigmoid", "label": "x"}]},
            r"method\.objectives\.1\.label: label 'x' is repeated",
        ),
        ({"name": "clip", "temperature": "hot"}, r"method\.temperature: invalid value"),
    ],
)
def test_recipe_errors_name_the_key_path(method: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate_recipe(recipe_tree(method))


def test_objective_that_does_not_fit_the_model_names_its_path() -> None:
    method = {
        "name": "composite",
        "objectives": [{"name": "sigmoid"}, {"name": "infonce", "modalities": ["image", "text"]}],
    }
    with pytest.raises(ConfigError, match=r"method\.objectives\.1\.modalities: infonce: the model has no encoder"):
        build(method)
    with pytest.raises(ConfigError, match=r"^method\.modalities: infonce: the model has no encoder"):
        build({"name": "clip", "modalities": ["image", "text"]})


def test_forward_is_features_and_loss_is_maths() -> None:
    method = build({"name": "clip"})
    batch = make_batch()
    outputs = method(batch)
    assert set(outputs.embeddings) == set(outputs.projections) == {"audio", "image"}
    for m in ("audio", "image"):
        torch.testing.assert_close(outputs.embeddings[m], F.normalize(outputs.projections[m], dim=-1))
    torch.testing.assert_close(method.loss(outputs, batch).loss, method.training_step(batch).loss)


def test_encoders_see_only_observed_rows() -> None:
    """BatchNorm statistics and outputs equal those of encoding the observed rows alone."""
    method = build({"name": "clip"})
    batch = make_batch(8)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    batch.present["image"] = keep
    batch.data["image"][~keep] = 0.0
    model: MultimodalModel = method.model
    ref = build({"name": "clip"}).model
    out = model(batch)
    ref_img = ref.encoders["image"](batch.data["image"][keep])
    bn_model = next(m for m in model.encoders["image"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_ref = next(m for m in ref.encoders["image"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(bn_model.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn_model.running_var, bn_ref.running_var)
    want = F.normalize(ref.heads["image"](ref_img.pooled), dim=-1)
    torch.testing.assert_close(out.embeddings["image"][keep], want)
    assert torch.equal(out.embeddings["image"][~keep], torch.zeros(3, 8))
    assert out.padding["image"][~keep].all() and not out.padding["image"][keep].any()


def test_a_modality_absent_from_every_row_trains_without_error() -> None:
    method = build({"name": "composite", "objectives": [{"name": "infonce"}, {"name": "sigmoid"}]})
    batch = make_batch()
    batch.present["audio"] = torch.zeros(6, dtype=torch.bool)
    outputs = method(batch)
    assert set(outputs.embeddings) == {"image"}
    out = method.loss(outputs, batch)
    assert out.loss.item() == 0.0
    out.loss.backward()  # connected: every objective's zero reaches the graph
    assert method.objectives["sigmoid"].logit_bias.grad is not None


def test_method_needs_an_objective_and_unique_labels() -> None:
    model = build({"name": "clip"}).model
    with pytest.raises(ValueError, match="at least one objective"):
        Method(model, [])
    with pytest.raises(ValueError, match="repeated"):
        Method(model, [("a", InfoNCE(), 1.0), ("a", SigmoidLoss(), 1.0)])
