"""Blocked (bounded-memory) evaluation equals the plain full-matrix computation.

The ``plain_*`` functions are the previous implementation, which held whole ``[N, M]`` rows: one
cosine matrix, a masked maximum per row for ranks, a full sort per row for average precision.
Inputs contain exact ties (duplicated rows, signed basis vectors), several positives per query
and unsorted ids; chunk sizes include 1 and sizes that do not divide ``N`` or ``M``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from modalign.eval import (
    class_match_metrics,
    first_positive_ranks,
    knn_predict,
    topk_neighbours,
    zero_shot_accuracy,
)
from modalign.eval.embed import l2_normalise

CHUNKS = list(itertools.product([1, 3, 64], [1, 5, 64]))  # (query chunk, gallery chunk)


def plain_ranks(query: Tensor, gallery: Tensor, qids: Tensor, gids: Tensor) -> Tensor:
    sims = l2_normalise(query) @ l2_normalise(gallery).T
    positive = qids[:, None] == gids[None, :]
    best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((sims >= best) & ~positive).sum(dim=1)


def plain_class_match(query: Tensor, gallery: Tensor, ql: Tensor, gl: Tensor) -> dict[str, float]:
    sims = l2_normalise(query) @ l2_normalise(gallery).T
    relevant = ql[:, None] == gl[None, :]
    keep = relevant.any(dim=1)
    sims, relevant = sims[keep], relevant[keep]
    best_rel = sims.masked_fill(~relevant, float("-inf")).amax(dim=1)
    best_irr = sims.masked_fill(relevant, float("-inf")).amax(dim=1)
    scores, order = sims.sort(dim=1, descending=True)
    rel = relevant.gather(1, order)
    m = scores.shape[1]
    positions = torch.arange(m).expand_as(scores)
    last_of_tie = torch.ones_like(rel)
    last_of_tie[:, :-1] = scores[:, :-1] != scores[:, 1:]
    group_end = torch.where(last_of_tie, positions, torch.full_like(positions, m))
    group_end = group_end.flip(1).cummin(dim=1).values.flip(1)
    precision = rel.double().cumsum(dim=1).gather(1, group_end) / (group_end + 1).double()
    ap = (precision * rel).sum(dim=1) / rel.sum(dim=1)
    return {"p@1": float((best_rel > best_irr).double().mean()), "mAP": float(ap.mean())}


def plain_topk(query: Tensor, gallery: Tensor, k: int) -> tuple[Tensor, Tensor]:
    sims = l2_normalise(query) @ l2_normalise(gallery).T
    idx = torch.stack([torch.tensor(sorted(range(len(r)), key=lambda j: (-float(r[j]), j))[:k]) for r in sims])
    return sims.gather(1, idx), idx


def tied_embeddings(n: int, dim: int, seed: int) -> Tensor:
    """Random rows where about a third are exact copies of other rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    copies = torch.randint(0, n, (n // 3,), generator=gen)
    x[torch.randperm(n, generator=gen)[: n // 3]] = x[copies].clone()
    return x


@pytest.mark.parametrize(("chunk", "gallery_chunk"), CHUNKS)
def test_ranks_equal_plain_with_ties(chunk: int, gallery_chunk: int) -> None:
    gallery = tied_embeddings(37, 6, seed=0)
    query = gallery + 0.7 * torch.randn(37, 6, generator=torch.Generator().manual_seed(1))
    query[::4] = gallery[::4]  # exact copies: the positive ties with duplicated negatives
    ids = torch.arange(37)
    got = first_positive_ranks(query, gallery, chunk_size=chunk, gallery_chunk_size=gallery_chunk)
    assert torch.equal(got, plain_ranks(query, gallery, ids, ids))
    assert got.max() > 1  # the ties matter


@pytest.mark.parametrize(("chunk", "gallery_chunk"), CHUNKS)
def test_ranks_equal_plain_with_unsorted_multi_positive_ids(chunk: int, gallery_chunk: int) -> None:
    gen = torch.Generator().manual_seed(2)
    gallery = tied_embeddings(41, 5, seed=3)
    gids = torch.randint(0, 13, (41,), generator=gen)  # several items per id, shuffled
    present = torch.unique(gids)
    qids = present[torch.randint(0, len(present), (29,), generator=gen)]
    query = torch.randn(29, 5, generator=gen)
    got = first_positive_ranks(query, gallery, qids, gids, chunk_size=chunk, gallery_chunk_size=gallery_chunk)
    assert torch.equal(got, plain_ranks(query, gallery, qids, gids))


def test_constant_embedder_worst_rank_in_blocks() -> None:
    ones = torch.ones(23, 4)
    assert first_positive_ranks(ones, ones, chunk_size=5, gallery_chunk_size=7).tolist() == [23] * 23


@pytest.mark.parametrize(("chunk", "gallery_chunk"), CHUNKS)
def test_class_match_equals_plain_with_ties(chunk: int, gallery_chunk: int) -> None:
    gen = torch.Generator().manual_seed(4)
    basis = torch.cat([torch.eye(3), -torch.eye(3)])  # similarities exactly -1, 0, 1
    gallery = torch.cat([basis[torch.randint(0, 6, (30,), generator=gen)], tied_embeddings(13, 3, seed=5)])
    query = torch.cat([basis[torch.randint(0, 6, (17,), generator=gen)], gallery[-9:]])
    gl = torch.randint(0, 4, (43,), generator=gen)
    ql = torch.randint(0, 5, (26,), generator=gen)  # label 4 is never relevant: left out
    got = class_match_metrics(query, gallery, ql, gl, chunk_size=chunk, gallery_chunk_size=gallery_chunk)
    expected = plain_class_match(query, gallery, ql, gl)
    assert got["p@1"] == expected["p@1"]
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)


@pytest.mark.parametrize(("chunk", "gallery_chunk"), [(1, 1), (4, 3), (1024, 4096)])
def test_class_match_single_label_and_random(chunk: int, gallery_chunk: int) -> None:
    gen = torch.Generator().manual_seed(6)
    query, gallery = torch.randn(31, 8, generator=gen), torch.randn(47, 8, generator=gen)
    for ql, gl in [
        (torch.zeros(31, dtype=torch.long), torch.zeros(47, dtype=torch.long)),  # everything relevant
        (torch.randint(0, 3, (31,), generator=gen), torch.randint(0, 3, (47,), generator=gen)),
    ]:
        got = class_match_metrics(query, gallery, ql, gl, chunk_size=chunk, gallery_chunk_size=gallery_chunk)
        expected = plain_class_match(query, gallery, ql, gl)
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("chunk", "gallery_chunk"), CHUNKS)
@pytest.mark.parametrize("k", [1, 4, 50])
def test_topk_neighbours_equal_plain(chunk: int, gallery_chunk: int, k: int) -> None:
    gallery = tied_embeddings(29, 4, seed=7)
    query = torch.cat([gallery[:5], torch.randn(6, 4, generator=torch.Generator().manual_seed(8))])
    sims, idx = topk_neighbours(query, gallery, k, chunk_size=chunk, gallery_chunk_size=gallery_chunk)
    want_sims, want_idx = plain_topk(query, gallery, min(k, 29))
    assert torch.equal(idx, want_idx)
    assert torch.allclose(sims, want_sims, atol=1e-6)  # other block shapes: last-bit differences


def test_knn_and_zero_shot_do_not_depend_on_blocks() -> None:
    gen = torch.Generator().manual_seed(9)
    train = tied_embeddings(60, 5, seed=10)
    labels = torch.randint(0, 7, (60,), generator=gen)
    protos = torch.cat([torch.randn(40, 5, generator=gen), train[:10]])
    protos[20:25] = protos[:5]  # exact ties between prototypes: the first listed must win
    test = torch.cat([train[:10], protos[:5], torch.randn(10, 5, generator=gen)])
    classes = torch.arange(50)
    test_labels = torch.randint(0, 50, (25,), generator=gen)
    plain_pred = classes[(l2_normalise(test) @ l2_normalise(protos).T).argmax(dim=1)]
    zs_expected = float((plain_pred == test_labels).double().mean())
    knn = [knn_predict(train, labels, test, k=5, chunk_size=c, gallery_chunk_size=g) for c, g in CHUNKS]
    assert all(torch.equal(p, knn[0]) for p in knn)
    for c, g in CHUNKS:
        assert zero_shot_accuracy(test, test_labels, protos, classes, c, g) == zs_expected
    assert plain_pred[10:15].tolist() == [0, 1, 2, 3, 4]
    test_labels = plain_pred.clone()
    for c, g in CHUNKS:
        assert zero_shot_accuracy(test, test_labels, protos, classes, c, g) == 1.0
