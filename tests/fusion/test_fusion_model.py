"""A fusing model: embeddings see one modality only, the fused vector every observed one;
GMC against a loop reference; modality dropout and the robustness perturbations; a tiny
fused training run whose fused probe beats chance with and without each modality."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modalign.core import Batch, ModalitySpec, Sample
from modalign.core.errors import ConfigError
from modalign.core.registry import create
from modalign.data.base import MultimodalDataset
from modalign.data.collate import Collator
from modalign.data.perturb import add_noise, drop_modalities, remove_modality
from modalign.encoders.vector import VectorMLP
from modalign.eval.embed import embed_loader
from modalign.eval.robustness import WithFused, evaluate_with_fused, robustness_metrics
from modalign.fusion.two_tower import NoFusion
from modalign.methods import Method, MultimodalModel
from modalign.objectives import GMC, InfoNCE, nt_xent_loss
from modalign.train.build import make_loader
from modalign.train.loop import Trainer
from modalign.train.recipe import TrainConfig


class Clusters(MultimodalDataset):
    """Four latent classes; x and y are noisy class-dependent vectors; y absent for every 6th sample."""

    def __init__(self, n: int = 192, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = torch.arange(n) % 4
        cx, cy = (
            2 * torch.randn(4, 6, generator=torch.Generator().manual_seed(9)),
            2 * torch.randn(4, 5, generator=torch.Generator().manual_seed(10)),
        )
        self.x = cx[self.label] + 0.6 * torch.randn(n, 6, generator=g)
        self.y = cy[self.label] + 0.6 * torch.randn(n, 5, generator=g)

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {"x": ModalitySpec("vector", channels=6), "y": ModalitySpec("vector", channels=5)}

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> Sample:
        values = {"x": self.x[i]} if i % 6 == 5 else {"x": self.x[i], "y": self.y[i]}
        return Sample(id=i, values=values, labels={"label": int(self.label[i])})


def make_method(fusion: str = "gated") -> Method:
    torch.manual_seed(0)
    encoders = {"x": VectorMLP(6, dim=16, hidden=32), "y": VectorMLP(5, dim=16, hidden=32)}
    heads: dict[str, nn.Module] = {m: nn.Linear(16, 8) for m in encoders}
    fuse = create("fusion", fusion, widths={"x": 16, "y": 16}, dim=16)
    model = MultimodalModel(encoders, heads, fuse, nn.Linear(16, 8))
    return Method(model, [("infonce", InfoNCE(temperature=0.2), 1.0), ("gmc", GMC(temperature=0.2), 1.0)])


def batch_of(ds: MultimodalDataset, idx: list[int]) -> Batch:
    return Collator(ds.modalities)([ds[i] for i in idx])


def nt_xent_reference(a: np.ndarray, b: np.ndarray, t: float) -> float:
    x = np.concatenate([a, b])
    n = a.shape[0]
    total = 0.0
    for k in range(2 * n):
        partner = k + n if k < n else k - n
        logits = [x[k] @ x[j] / t for j in range(2 * n) if j != k]
        lse = math.log(sum(math.exp(v) for v in logits))
        total += lse - x[k] @ x[partner] / t
    return total / (2 * n)


def test_nt_xent_matches_a_loop_reference_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    b = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    loss = nt_xent_loss(a, b, 0.3)
    assert loss.item() == pytest.approx(nt_xent_reference(a.detach().numpy(), b.detach().numpy(), 0.3), rel=1e-10)
    assert torch.autograd.gradcheck(lambda p, q: nt_xent_loss(p, q, 0.3), (a, b))


def test_nt_xent_is_lowest_when_each_view_sits_on_its_partner() -> None:
    e = torch.eye(4, dtype=torch.float64)
    aligned = nt_xent_loss(e, e, 0.1)
    shuffled = nt_xent_loss(e, e[[1, 2, 3, 0]], 0.1)
    assert aligned.item() < shuffled.item()
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(e[:1], e[:1], 0.1)


def test_embeddings_never_see_the_partner_and_fused_sees_both() -> None:
    ds = Clusters()
    method = make_method().eval()
    batch = batch_of(ds, list(range(8)))
    out = method.model(batch)
    changed = Batch(**{**batch.__dict__, "data": {**batch.data, "y": torch.randn(batch.data["y"].shape)}})
    out2 = method.model(changed)
    torch.testing.assert_close(out.embeddings["x"], out2.embeddings["x"])
    assert out.fused is not None and out2.fused is not None and out.fused_embedding is not None
    both = batch.rows("y")
    assert not torch.allclose(out.fused[both], out2.fused[both])
    torch.testing.assert_close(out.fused[~both], out2.fused[~both])  # y absent there


def test_gmc_needs_a_fusion_module_and_two_modalities() -> None:
    encoders = {"x": VectorMLP(6, dim=16), "y": VectorMLP(5, dim=16)}
    model = MultimodalModel(encoders, {m: nn.Linear(16, 8) for m in encoders}, NoFusion())
    with pytest.raises(ConfigError, match=r"model\.fusion"):
        Method(model, [("gmc", GMC(), 1.0)])
    fused = make_method().model
    with pytest.raises(ConfigError, match="modalities"):
        Method(fused, [("gmc", GMC(modalities=["x", "z"]), 1.0)])


def test_gmc_loss_is_nt_xent_of_each_modality_alone_against_the_joint_view() -> None:
    ds = Clusters()
    method = make_method()
    batch = batch_of(ds, list(range(12)))
    outputs = method(batch)
    gmc = method.objectives["gmc"]
    out = gmc(outputs, batch)
    rows = batch.rows("x") & batch.rows("y")
    z = outputs.fused_embedding
    assert z is not None
    for m in ("x", "y"):
        alone = method.model.encoders[m](batch.data[m])
        fused_alone = method.model.fusion(
            {m: alone.__class__(alone.tokens, alone.pooled, None)}, {m: torch.ones(12, dtype=torch.bool)}
        )
        view = F.normalize(method.model.fusion_head(fused_alone.pooled), dim=-1)
        want = nt_xent_loss(view[rows], z[rows], 0.2)
        torch.testing.assert_close(out.parts[m], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, (out.parts["x"] + out.parts["y"]) / 2)
    assert out.metrics["complete"] == float(rows.sum())


def test_modality_dropout_removes_values_and_never_a_whole_row() -> None:
    ds = Clusters()
    batch = batch_of(ds, list(range(60)))
    g = torch.Generator().manual_seed(0)
    dropped = drop_modalities(batch, 0.6, g)
    kept = torch.stack([dropped.rows("x"), dropped.rows("y")], 1)
    assert bool(kept.any(dim=1).all()), "a row lost every modality"
    assert int((~kept).sum()) > 10
    for m in ("x", "y"):
        gone = batch.rows(m) & ~dropped.rows(m)
        assert bool((dropped.data[m][gone] == 0).all())
        assert bool((~batch.rows(m) <= ~dropped.rows(m)).all())  # absent stays absent
    assert drop_modalities(batch, 0.0) is batch
    with pytest.raises(ValueError, match="modality dropout"):
        drop_modalities(batch, 1.0)


def test_remove_and_noise_name_the_modality_and_touch_only_it() -> None:
    ds = Clusters()
    batch = batch_of(ds, list(range(12)))
    removed = remove_modality(batch, "y")
    assert not bool(removed.rows("y").any()) and bool((removed.data["y"] == 0).all())
    torch.testing.assert_close(removed.data["x"], batch.data["x"])
    noisy = add_noise(batch, "x", 1.0, torch.Generator().manual_seed(0))
    diff = (noisy.data["x"] - batch.data["x"]).std().item()
    assert 0.5 * batch.data["x"].std().item() < diff < 2 * batch.data["x"].std().item()
    torch.testing.assert_close(noisy.data["y"], batch.data["y"])
    with pytest.raises(KeyError, match="'z'"):
        remove_modality(batch, "z")


def test_token_noise_replaces_about_half_the_unpadded_tokens() -> None:
    ids = torch.arange(1, 401).view(20, 20)
    padding = torch.zeros(20, 20, dtype=torch.bool)
    padding[:, 15:] = True
    batch = Batch(data={"t": ids.masked_fill(padding, 0)}, present={"t": torch.ones(20, dtype=torch.bool)},
                  ids=torch.arange(20), padding={"t": padding})  # fmt: skip
    noisy = add_noise(batch, "t", 1.0, torch.Generator().manual_seed(0))
    changed = (noisy.data["t"] != batch.data["t"]) & ~padding
    assert 0.35 < changed.sum().item() / (~padding).sum().item() < 0.65
    assert bool((noisy.data["t"][padding] == 0).all())


def test_a_short_fused_run_beats_chance_with_and_without_each_modality(tmp_path: Path) -> None:
    train_ds, test_ds = Clusters(192, seed=0), Clusters(96, seed=1)
    method = make_method()
    cfg = TrainConfig(epochs=10, batch_size=32, lr=3e-3, warmup_steps=5, log_every=6, device="cpu",
                      modality_dropout=0.3, track="none")  # fmt: skip
    Trainer(method, train_ds, cfg, tmp_path, torch.device("cpu")).fit(resume=False)

    def embed(ds: MultimodalDataset, transform=None):  # type: ignore[no-untyped-def]
        loader = make_loader(ds, 64, shuffle=False)
        batches = loader if transform is None else (transform(b) for b in loader)
        return embed_loader(WithFused(method), batches)

    train, test = embed(train_ds), embed(test_ds)
    metrics = evaluate_with_fused(train, test, "label", knn_k=5)
    robust = robustness_metrics(lambda t: embed(test_ds, t), train, ("x", "y"), "label", 1.0, knn_k=5)
    # four balanced classes: chance is 0.25
    assert metrics["fused/linear_probe"] > 0.8, metrics
    # without x the fused probe falls towards what y alone gives (y is the weaker modality)
    assert robust["missing:y/fused/linear_probe"] > 0.8 and robust["missing:x/fused/linear_probe"] > 0.4, robust
    assert "missing:y/y/linear_probe" not in robust and "missing:y/x/linear_probe" in robust
    assert robust["noise:x/x/linear_probe"] < metrics["x/linear_probe"] + 1e-9
    assert not any(k.startswith("fused->") or "->fused" in k for k in metrics), "fused is never paired"
