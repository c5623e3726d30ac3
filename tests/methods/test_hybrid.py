"""Hybrid presets: ALBEF (ITC with momentum distillation + ITM + MLM) and FLAVA-lite.

The presets are compositions, so the tests check the composition (entries, validation, every
part trained by one backward pass, hooks reached) and a short real run of each emoji recipe.
The objectives themselves are tested against references in ``tests/objectives``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalign.core import Batch, ConfigError, ModalitySpec, StepContext
from modalign.methods import Method
from modalign.train.build import build_method
from modalign.train.recipe import expand_method, validate_recipe

VOCAB = 30
SPECS = {"image": ModalitySpec("image", channels=1, size=8), "text": ModalitySpec("text", vocab_size=VOCAB)}
ENCODERS = {
    "image": {"name": "image_vit", "patch": 4, "dim": 16, "depth": 1, "heads": 2},
    "text": {"name": "text_transformer", "dim": 16, "depth": 1, "heads": 2, "max_len": 8},
}


def build(method: dict) -> Method:
    tree = {"data": {"name": "emoji"}, "model": {"embed_dim": 8, "encoders": ENCODERS}, "method": method}
    torch.manual_seed(0)
    return build_method(validate_recipe(tree), SPECS)


def make_batch(n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, VOCAB - 3, (n, 7), generator=g)
    text[:, 0] = 2
    lengths = torch.tensor([7, 3, 5, 4, 7, 4, 6, 5])[:n]
    text[torch.arange(7)[None] >= lengths[:, None]] = 0
    return Batch(
        data={"image": torch.randn(n, 1, 8, 8, generator=g), "text": text},
        present={m: torch.ones(n, dtype=torch.bool) for m in ("image", "text")},
        ids=torch.arange(n),
        padding={"text": text == 0},
    )


def labels_and_names(method: dict) -> list[tuple[str, str]]:
    return [(s.label, s.name) for s in expand_method(method)]


def test_albef_is_itc_with_distillation_plus_itm_plus_conditioned_mlm() -> None:
    assert labels_and_names({"name": "albef"}) == [("itc", "moco"), ("itm", "itm"), ("mlm", "masked_conditional")]
    method = build({"name": "albef", "distill": 0.4, "queue_size": 16})
    itc = method.objectives["itc"]
    assert itc.distill == 0.4 and itc.queue_size == 16
    assert method.objectives["mlm"].target == "text" and method.objectives["mlm"].context == "image"


def test_flava_is_unimodal_masked_plus_itc_plus_itm() -> None:
    got = labels_and_names({"name": "flava"})
    assert got == [("mim", "multimae"), ("mlm", "multimae"), ("itc", "infonce"), ("itm", "itm")]
    method = build({"name": "flava"})
    assert method.objectives["mim"].modalities == ("image",)
    assert method.objectives["mlm"].modalities == ("text",)


@pytest.mark.parametrize("name", ["albef", "flava"])
def test_one_backward_trains_every_part_and_the_hooks_run(name: str) -> None:
    method = build({"name": name, **({"queue_size": 16} if name == "albef" else {})})
    method.train()
    batch = make_batch()
    out = method.loss(method(batch), batch)
    labels = {"albef": ["itc", "itm", "mlm"], "flava": ["mim", "mlm", "itc", "itm"]}[name]
    parts = [float(out.parts[label].detach()) for label in labels]
    assert all(torch.isfinite(torch.tensor(parts))) and all(p > 0 for p in parts), out.parts
    want = sum(float(out.parts[label].detach()) for label in labels)  # unit weights
    assert float(out.loss) == pytest.approx(want, rel=1e-5)
    out.loss.backward()
    trained = [p for n, p in method.named_parameters() if p.requires_grad and "teacher" not in n]
    no_grad = [n for n, p in method.named_parameters() if p.requires_grad and "teacher" not in n and p.grad is None]
    assert trained and not no_grad, no_grad
    if name == "albef":
        itc = method.objectives["itc"]
        before = int(itc.queue_ptr)
        method.after_step(StepContext(step=1, epoch=0, total_steps=10, steps_per_epoch=10))
        assert int(itc.queue_ptr) == (before + 8) % 16


BAD = [
    ({"name": "albef", "itm_weight": -1.0}, "itm_weight"),
    ({"name": "flava", "masked_weight": -0.5}, "masked_weight"),
    ({"name": "albef", "modalities": ["text", "text"]}, "modalities"),
]


@pytest.mark.parametrize(("method", "path"), BAD)
def test_bad_arguments_name_their_key(method: dict, path: str) -> None:
    with pytest.raises(ConfigError, match=path):
        build(method)


def _train_cli(args: list[str]) -> None:
    from typer.testing import CliRunner

    from modalign.cli.main import app

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["emoji-albef", "emoji-flava"])
def test_emoji_hybrid_recipes_beat_chance(recipe: str, data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train_cli([recipe, "train.epochs=3", "eval.probe=false", "eval.plots=false", "--run-dir", str(run),
                "--data-root", str(data_root)])  # fmt: skip
    metrics = json.loads((run / "eval.json").read_text())
    # 400 held-out emoji: chance for R@10 is 0.025
    assert metrics["image->text/R@10"] > 0.06 and metrics["text->image/R@10"] > 0.06, metrics
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/itm" in row for row in log) and any("loss/mlm" in row for row in log)
