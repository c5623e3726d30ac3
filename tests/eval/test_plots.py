"""Every plot function writes a real PNG file (headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import pytest
import torch

from modalign.eval import EvalInputError, plot_loss_curve, plot_projection, plot_similarity_matrix
from modalign.eval.plots import _epoch_starts, _stack_modalities, smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def test_backend_is_agg() -> None:
    assert matplotlib.get_backend().lower() == "agg"


def test_loss_curve(tmp_path: Path) -> None:
    records: list[dict[str, float]] = [
        {"step": s, "epoch": s // 40, "loss": 3.0 * np.exp(-s / 50) + 0.1 * np.sin(s), "lr": 1e-3} for s in range(120)
    ]
    records.insert(60, {"step": 60, "eval/R@1": 0.4})  # an eval record without "loss" is skipped
    out = plot_loss_curve(records, tmp_path / "sub" / "loss.png", keys=("loss", "lr"))
    assert out == tmp_path / "sub" / "loss.png"
    assert_png(out)


def test_epoch_boundaries_of_fractional_epochs() -> None:
    """Step records log a fractional epoch, epoch summaries the epochs completed."""
    records = [{"step": s, "epoch": s / 4} for s in range(1, 8)] + [{"step": 4, "epoch": 1}, {"step": 8, "epoch": 2}]
    assert _epoch_starts(records) == [4.0, 8.0]


def test_loss_curve_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="no record has the key 'loss'"):
        plot_loss_curve([{"step": 1, "acc": 0.5}], tmp_path / "x.png")
    with pytest.raises(EvalInputError, match=r"records\[0\]: has 'loss' but no 'step'"):
        plot_loss_curve([{"loss": 1.0}], tmp_path / "x.png")


def test_smooth_is_trailing_mean() -> None:
    got = smooth(np.array([1.0, 2.0, 3.0, 4.0]), window=2)
    assert np.allclose(got, [1.0, 1.5, 2.5, 3.5])


@pytest.mark.parametrize("with_labels", [True, False])
def test_similarity_matrix(tmp_path: Path, with_labels: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(100, 8, generator=gen)
    labels = torch.randint(0, 4, (100,), generator=gen) if with_labels else None
    out = plot_similarity_matrix(
        a,
        a + 0.5 * torch.randn(100, 8, generator=gen),
        labels,
        tmp_path / "sim.png",
        max_items=40,
        names=("image", "text"),
    )
    assert_png(out)


def test_similarity_matrix_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="paired row by row"):
        plot_similarity_matrix(torch.randn(5, 3), torch.randn(6, 3), None, tmp_path / "x.png")
    with pytest.raises(EvalInputError, match=r"labels: expected a Tensor\[5\]"):
        plot_similarity_matrix(
            torch.randn(5, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), tmp_path / "x.png"
        )


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projection(tmp_path: Path, method: Literal["pca", "tsne"]) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(150, 16, generator=gen)
    embeddings = {"image": x, "text": x + 1.0, "audio": -x}
    labels = torch.randint(0, 3, (150,), generator=gen)
    out = plot_projection(embeddings, labels, tmp_path / f"{method}.png", method=method, max_points=120)
    assert_png(out)


def test_projection_without_labels_and_errors(tmp_path: Path) -> None:
    x = torch.randn(30, 4)
    assert_png(plot_projection({"a": x, "b": x.flip(0)}, None, tmp_path / "p.png"))
    with pytest.raises(EvalInputError, match="unknown projection 'umap'"):
        plot_projection({"a": x}, None, tmp_path / "p.png", method="umap")  # type: ignore[arg-type]
    with pytest.raises(EvalInputError, match=r"embeddings\['b'\]: shape \(29, 4\)"):
        plot_projection({"a": x, "b": x[:29]}, None, tmp_path / "p.png")


def test_projection_skips_absent_rows(tmp_path: Path) -> None:
    x = torch.randn(40, 6)
    present = {"a": torch.arange(40) < 30, "b": torch.arange(40) >= 25}
    labels = torch.arange(40) % 3
    names, points, owner, point_labels = _stack_modalities({"a": x, "b": -x}, labels, present, 1000, 0)
    assert names == ["a", "b"]
    assert (owner == 0).sum() == 30 and (owner == 1).sum() == 15
    assert np.allclose(points[owner == 1][0], -(x[25] / x[25].norm()).numpy(), atol=1e-6)
    assert point_labels is not None and point_labels.tolist()[30] == 25 % 3
    assert_png(plot_projection({"a": x, "b": -x}, labels, tmp_path / "p.png", present=present))
    with pytest.raises(EvalInputError, match=r"present\['a'\]: expected a BoolTensor\[40\]"):
        plot_projection({"a": x}, None, tmp_path / "p.png", present={"a": torch.ones(40)})
