"""The ``emoji-ot`` recipe (InfoNCE + ``ot_tokens`` on Twemoji): a short real run and its word-region plans.

The objective itself is tested against references in ``test_unaligned.py``; here the packaged
recipe trains on the real data, beats chance on the held-out emoji, and its trained token space
gives transport plans between label words and image regions (what ``benchmarks/unaligned_emoji.py``
plots).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modalign.data.collate import collate
from modalign.objectives.token_alignment import OTTokens, ot_token_plan
from modalign.train.build import build_dataset
from modalign.train.recipe import load_recipe
from modalign.train.records import METRICS_FILE, read_metrics
from modalign.train.run import load_artifacts, load_run, train_run

SHORT = ["train.epochs=2", "train.threads=1", "eval.probe=false", "eval.plots=false", "eval.report=false"]


@pytest.mark.slow
def test_emoji_ot_recipe_beats_chance_and_plans_words_to_regions(data_root: Path, tmp_path: Path) -> None:
    """Two epochs: held-out R@10 above 0.06 (chance 0.025); plans ``[N, words, 64 cells]``, uniform marginals."""
    recipe = load_recipe("emoji-ot", SHORT)
    recipe.data = {**recipe.data, "root": str(data_root)}
    run = tmp_path / "run"
    metrics = train_run(recipe, run)
    assert metrics is not None
    assert metrics["image->text/R@10"] > 0.06 and metrics["text->image/R@10"] > 0.06, metrics
    assert any("loss/ot_tokens" in row for row in read_metrics(run / METRICS_FILE))

    recipe, method = load_run(run, str(data_root))
    method.eval()
    test = build_dataset(recipe, "test", artifacts=load_artifacts(run), augment=False)
    batch = collate([test[i] for i in range(8)], test.modalities)
    objective = method.objectives["ot_tokens"]
    assert isinstance(objective, OTTokens)
    with torch.no_grad():
        outputs = method(batch)
        text = objective.project.maps["text"](outputs.tokens["text"])
        image = objective.project.maps["image"](outputs.tokens["image"])
    padding = outputs.padding["text"]
    plan = ot_token_plan(text, padding, image, None, epsilon=0.05, iterations=200)
    assert plan.shape == (8, text.shape[1], 64)  # 32 px through three CNN stages: 8 x 8 regions
    torch.testing.assert_close(plan.sum(dim=(1, 2)), torch.ones(8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((8, 64), 1 / 64), rtol=1e-3, atol=1e-5)
    assert bool((plan[padding] == 0).all())
