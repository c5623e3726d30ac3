"""Distributed equals single process for the matching objectives on a 2-rank CPU gloo group.

ITM with ``gather=True`` samples each rank's hard negatives from every rank's rows and fuses
them with tokens gathered with gradient. Sampling is random, so each rank records the pairs it
fused (as rows of the global batch); the single-process reference fuses exactly those pairs on
the full batch. DDP averages gradients, so the mean of the per-rank losses, the per-rank token
gradients concatenated and divided by the world size, and the head's parameter gradients summed
and divided by the world size must equal the reference's. Ranks hold different numbers of rows
(one none) and text of different lengths. ``itm_loss``/``avc_loss`` are checked the same way on
slices of one logits tensor. Modelled on ``tests/distributed/test_gather_ddp.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from modalign import distributed as mdist
from modalign.core import Batch, Outputs
from modalign.objectives import ImageTextMatching, avc_loss, itm_loss
from support.ddp import init_gloo, spawn_ranks

WORLD = 2
N = 8
SPLITS = [(4, 4), (3, 5), (0, 8)]
IDS = torch.tensor([0, 1, 2, 5, 4, 5, 6, 1])  # text ids 1 and 5 repeat across the rank boundary
IMAGE_IDS = torch.tensor([10, 11, 12, 13, 10, 15, 16, 17])  # image content 10 on both ranks
LENGTHS = torch.tensor([2, 1, 3, 2, 5, 4, 1, 3])  # text lengths: rank slices have different T
DIMS = {"text": 8, "image": 12}
LABELS = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0])

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available() or sys.platform in ("win32", "cygwin"),
        reason="needs torch.distributed with the gloo backend",
    ),
]


class _Width(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim


class StubModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: _Width(d) for m, d in DIMS.items()})

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted(self.encoders))


def make_itm(temperature: float = 0.5) -> ImageTextMatching:
    torch.manual_seed(0)
    obj = ImageTextMatching(modalities=["text", "image"], heads=2, temperature=temperature, gather=True)
    obj.label = "itm"
    obj.bind(StubModel())
    return obj.double()


def global_inputs(peaked: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(N, 5, 8, generator=g, dtype=torch.float64)
    image = torch.randn(N, 4, 12, generator=g, dtype=torch.float64)
    emb_t = F.normalize(torch.randn(N, 6, generator=g, dtype=torch.float64), dim=-1)
    emb_i = F.normalize(torch.randn(N, 6, generator=g, dtype=torch.float64), dim=-1)
    if peaked:  # text i is most similar to image i + 4: each row's hardest negative is on the other rank
        emb_t = torch.eye(N, dtype=torch.float64)
        emb_i = emb_t.roll(4, dims=0)
    logits = torch.randn(N, 2, generator=g, dtype=torch.float64)
    padding = torch.arange(5)[None, :] >= LENGTHS[:, None]
    return {"text": text, "image": image, "emb_text": emb_t, "emb_image": emb_i, "padding": padding, "logits": logits}


def rank_slice(x: dict[str, Tensor], sl: slice, distinct: bool = False) -> tuple[Outputs, Batch]:
    """This rank's rows; the text is trimmed to the longest text of the slice (``distinct``: all ids differ)."""
    n = sl.stop - sl.start
    t = int(LENGTHS[sl].max()) if n > 0 else 5
    outputs = Outputs(
        embeddings={"text": x["emb_text"][sl].clone(), "image": x["emb_image"][sl].clone()},
        tokens={"text": x["text"][sl, :t].clone().requires_grad_(), "image": x["image"][sl].clone().requires_grad_()},
        padding={"text": x["padding"][sl, :t]},
    )
    ones = torch.ones(n, dtype=torch.bool)
    batch = Batch(
        data={"text": torch.zeros(n, t, dtype=torch.long), "image": torch.zeros(n, 1)},
        present={"text": ones, "image": ones},
        ids=torch.arange(N)[sl] if distinct else IDS[sl],
        modality_ids={"image": (torch.arange(N) + N)[sl] if distinct else IMAGE_IDS[sl]},
    )
    return outputs, batch


def run_itm(sl: slice, peaked: bool = False) -> dict[str, Tensor]:
    obj, x = make_itm(1e-3 if peaked else 0.5), global_inputs(peaked)
    outputs, batch = rank_slice(x, sl, distinct=peaked)
    extras = obj.features(StubModel(), batch, outputs)
    outputs.extras.update({obj.key(k): v for k, v in extras.items()})
    loss = obj(outputs, batch).loss
    loss.backward()
    out = {"loss": loss.detach(), "text": outputs.tokens["text"].grad, "image": outputs.tokens["image"].grad}
    out.update({k: extras[k] for k in ("index_a", "index_b", "labels")})
    out.update({f"param/{n}": p.grad for n, p in obj.named_parameters()})
    return {k: v if v is not None else torch.zeros(()) for k, v in out.items()}


def run_plain(fn_name: str, sl: slice, gather: bool) -> dict[str, Tensor]:
    logits = global_inputs()["logits"][sl].clone().requires_grad_()
    fn = itm_loss if fn_name == "itm_loss" else avc_loss
    loss = fn(logits, LABELS[sl], gather=gather)
    loss.backward()
    grad = logits.grad if logits.grad is not None else torch.zeros(0, 2, dtype=torch.float64)
    return {"loss": loss.detach(), "grad": grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        assert mdist.is_initialized() and mdist.world_size() == WORLD
        results: dict[str, dict[str, Tensor]] = {}
        for split in SPLITS:
            lo = sum(split[:rank])
            sl = slice(lo, lo + split[rank])
            torch.manual_seed(100 + rank)  # ranks draw different negatives, as in training
            results[f"itm{split}"] = run_itm(sl)
            for fn_name in ("itm_loss", "avc_loss"):
                results[f"{fn_name}{split}"] = run_plain(fn_name, sl, gather=True)
        results["peaked"] = run_itm(slice(4 * rank, 4 * rank + 4), peaked=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Tensor]]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_matching"), WORLD, timeout_s=90)


def reference(index_a: Tensor, index_b: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """One process: the same fused pairs on the full batch (untrimmed text), loss and gradients."""
    obj, x = make_itm(), global_inputs()
    text, image = x["text"].clone().requires_grad_(), x["image"].clone().requires_grad_()
    assert obj.head is not None
    no_pad = torch.zeros(N, 4, dtype=torch.bool)
    logits = obj.head(text[index_a], x["padding"][index_a], image[index_b], no_pad[index_b])
    loss = itm_loss(logits, labels)
    loss.backward()
    out = {"loss": loss.detach(), "text": text.grad, "image": image.grad}
    out.update({f"param/{n}": p.grad for n, p in obj.named_parameters()})
    return {k: v if v is not None else torch.zeros(()) for k, v in out.items()}


@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_itm_gathered_equals_single_process_on_the_same_pairs(
    rank_results: list[dict[str, dict[str, Tensor]]], split: tuple[int, int]
) -> None:
    per_rank = [r[f"itm{split}"] for r in rank_results]
    pairs = {k: torch.cat([r[k] for r in per_rank]) for k in ("index_a", "index_b", "labels")}
    assert pairs["labels"].tolist().count(1) == N  # every global row is one positive
    for a, b in zip(pairs["index_a"].tolist(), pairs["index_b"].tolist(), strict=True):
        if a != b:  # negatives never hold the same text or image content
            assert IDS[a] != IDS[b] and IMAGE_IDS[a] != IMAGE_IDS[b]
    single = reference(pairs["index_a"], pairs["index_b"], pairs["labels"])
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"], atol=1e-10, rtol=1e-10)
    image = torch.cat([r["image"] for r, n in zip(per_rank, split, strict=True) if n > 0]) / WORLD
    torch.testing.assert_close(image, single["image"], atol=1e-10, rtol=1e-10)
    for r, n, lo in zip(per_rank, split, (0, split[0]), strict=True):
        if n == 0:
            continue
        t = r["text"].shape[1]  # this rank's text was trimmed to t tokens
        torch.testing.assert_close(r["text"] / WORLD, single["text"][lo : lo + n, :t], atol=1e-10, rtol=1e-10)
        if t < 5:  # the columns this rank never held are padding: no gradient in the reference either
            assert single["text"][lo : lo + n, t:].abs().max() == 0
    for key in single:
        if key.startswith("param/"):
            summed = sum(r[key] for r in per_rank) / WORLD
            torch.testing.assert_close(summed, single[key], atol=1e-10, rtol=1e-10)
            assert single[key].abs().sum() > 0
    assert single["text"].abs().sum() > 0 and single["image"].abs().sum() > 0


def test_itm_draws_hard_negatives_from_the_other_rank(rank_results: list[dict[str, dict[str, Tensor]]]) -> None:
    """Text i's hardest image is i + 4 (mod 8), on the other rank: the gallery really is global."""
    for rank, r in enumerate(rank_results):
        rows = list(range(4 * rank, 4 * rank + 4))
        neg_b = r["peaked"]["index_b"][4:8].tolist()
        neg_a = r["peaked"]["index_a"][8:12].tolist()
        assert neg_b == [(i + 4) % N for i in rows]
        assert neg_a == [(i - 4) % N for i in rows]


@pytest.mark.parametrize("fn_name", ["itm_loss", "avc_loss"])
@pytest.mark.parametrize("split", SPLITS, ids=[f"{x}+{y}" for x, y in SPLITS])
def test_pair_losses_gathered_equal_single_process(
    rank_results: list[dict[str, dict[str, Tensor]]], fn_name: str, split: tuple[int, int]
) -> None:
    single = run_plain(fn_name, slice(0, N), gather=False)
    per_rank = [r[f"{fn_name}{split}"] for r in rank_results]
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"], atol=1e-12, rtol=1e-12)
    grads = torch.cat([r["grad"] for r in per_rank]) / WORLD
    torch.testing.assert_close(grads, single["grad"], atol=1e-12, rtol=1e-12)
    if split == (3, 5):  # guard: with uneven ranks the mean of the local means is another number
        logits = global_inputs()["logits"]
        local = (itm_loss(logits[:3], LABELS[:3]) + itm_loss(logits[3:], LABELS[3:])) / 2
        assert abs(float(local) - float(single["loss"])) > 1e-6
