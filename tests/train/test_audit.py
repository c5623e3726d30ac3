"""The pair audit: ``audit_pairs`` on synthetic two-view features, ``modalign audit-pairs`` end to end.

``audit_pairs`` must find injected mismatches (AUC, estimated share) and give exactly the weights
``crossfit_infonce`` trains with (``posterior: lfdr``); the command must read a recipe's (or a
run's) encoders, report the truth under ``data.pair_noise`` and write a CSV, most suspect first.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.objectives.crossfit import CrossFitInfoNCE, audit_pairs
from support.colours import COLOURS, colour_rows

runner = CliRunner()


def two_views(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``a [n, 12]``, ``b [n, 10]`` of a shared 6-d latent, the first ``noise * n`` b rows cycled."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    a = z @ torch.randn(6, 12, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, 12, generator=g, dtype=torch.float64
    )
    b = z @ torch.randn(6, 10, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, 10, generator=g, dtype=torch.float64
    )
    q = round(noise * n)
    b[:q] = b[:q].roll(1, 0)
    return a, b, torch.arange(n) < q


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.5])
def test_audit_finds_the_injected_mismatches_and_their_share(noise: float) -> None:
    a, b, truth = two_views(600, noise, seed=1)
    ids = torch.arange(600)
    audit = audit_pairs(a, b, ids, ids + 1000)
    assert audit.noise_estimate == pytest.approx(noise, abs=0.06)  # measured 0.000 / 0.230 / 0.527 (AUC 1.0)
    if noise > 0:
        assert roc_auc_score(truth.numpy(), audit.pvalues.numpy()) > 0.95
        assert float(audit.lfdr[truth].mean()) > 0.8 > 0.2 > float(audit.lfdr[~truth].mean())


def test_audit_gives_the_weights_crossfit_trains_with() -> None:
    a, b, _ = two_views(300, 0.3, seed=2)
    ids = torch.arange(300)
    objective = CrossFitInfoNCE(posterior="lfdr", threshold=None, folds=4, rounds=3, ridge=0.5, score_temperature=0.1)
    weights = objective.fit_weights(a, b, ids, ids)
    audit = audit_pairs(a, b, ids, ids, folds=4, rounds=3, ridge=0.5, temperature=0.1)
    torch.testing.assert_close(weights, (1.0 - audit.lfdr).float(), rtol=0, atol=0)
    assert float(objective.noise_estimate) == pytest.approx(audit.noise_estimate, rel=1e-6)  # a float32 buffer


@pytest.mark.parametrize(
    "kwargs", [{"folds": 1}, {"folds": 400}, {"rounds": 0}, {"ridge": 0.0}, {"temperature": -1.0}, {"null_above": 1.0}]
)
def test_audit_bad_arguments_raise(kwargs: dict[str, float]) -> None:
    a, b, _ = two_views(300, 0.0, seed=3)
    with pytest.raises(ValueError, match="audit_pairs needs"):
        audit_pairs(a, b, torch.arange(300), torch.arange(300), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the command


def colour_manifest(folder: Path, n_per_colour: int) -> Path:
    """``colour_rows`` written as a JSONL manifest."""
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in colour_rows(folder, n_per_colour, seed=0)))
    return path


def recipe_args(folder: Path) -> list[str]:
    manifest = colour_manifest(folder, 25)
    return [
        "av-digits-clip",
        f"data={{name: manifest, train_file: {manifest}, test_file: {manifest}, label_columns: [colour], "
        "image_size: 16, max_tokens: 8}",
        "model.encoders={image: {name: image_cnn, widths: [16, 32]}, caption: {name: text_bow}}",
        "eval.label=colour",
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_command_reports_the_truth_and_writes_the_pairs_most_suspect_first(tmp_path: Path) -> None:
    """Untrained towers: a colour's images share one random pooled vector, its captions another."""
    out = tmp_path / "audit.csv"
    page = tmp_path / "audit.html"
    args = ["audit-pairs", *recipe_args(tmp_path), "data.pair_noise=0.4", "--out", str(out), "--html", str(page)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = {line.split()[0]: float(line.split()[1]) for line in result.output.splitlines()[:-2]}
    assert summary["pairs"] == 200 and summary["injected"] == 0.4
    # 8 colours: a random partner is of the right colour 1 time in 8 (measured: AUC 0.95, estimate 0.46)
    assert summary["auc"] > 0.9 and summary["noise_estimate"] == pytest.approx(0.4, abs=0.1)
    rows = read_rows(out)
    assert len(rows) == 200 and {r["sample_id"] for r in rows} == {str(i) for i in range(200)}
    lfdr = [float(r["lfdr"]) for r in rows]
    assert lfdr == sorted(lfdr, reverse=True)
    wrong = [r["content_image"] != r["content_caption"] for r in rows]  # a manifest row is one content
    assert [r["injected"] == "1" for r in rows] == wrong
    assert all(math.isfinite(float(r["p_value"])) for r in rows)
    names = list(COLOURS)  # the manifest lists 25 rows per colour, sample id = row index
    # the noise replaces the second modality in sorted order (image): every pair holds its own caption
    assert all(f" {names[int(r['sample_id']) // 25]} patch" in r["text_caption"] for r in rows)
    text = page.read_text()
    suspect = text[text.index('id="suspect"') : text.index('id="trusted"')]
    assert suspect.count('<img class="thumb"') == 40 and suspect.count("patch</div>") == 40  # both values shown
    assert suspect.count('<td class="num">yes</td>') >= 36  # the 40 most suspect are nearly all injected
    assert "http" not in text.replace("http-equiv", "")  # self-contained


def test_command_without_noise_has_no_truth_and_names_bad_modalities(tmp_path: Path) -> None:
    args = recipe_args(tmp_path)
    result = runner.invoke(app, ["audit-pairs", *args])
    assert result.exit_code == 0, result.output
    assert "noise_estimate" in result.output and "auc" not in result.output
    result = runner.invoke(app, ["audit-pairs", *args, "--modalities", "image,audio"])
    assert result.exit_code == 2 and "--modalities" in result.output


def test_command_reads_a_trained_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*recipe_args(tmp_path), "data.pair_noise=0.4", "train.epochs=2", "train.batch_size=32"]
    trained = runner.invoke(app, ["train", *args, "eval.plots=false", "--run-dir", str(run)])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["audit-pairs", str(run)])
    assert result.exit_code == 0, result.output
    assert "injected" in result.output and "auc" in result.output  # the run's recipe, noise included
    result = runner.invoke(app, ["audit-pairs", str(run), "data.pair_noise=0.1"])
    assert result.exit_code == 2 and "overrides" in result.output
