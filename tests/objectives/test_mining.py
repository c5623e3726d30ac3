"""Anchor-guided cluster matching (``mine_clusters``) and its parts, against brute force.

* ``anchor_votes`` against a loop; ``match_clusters`` against every permutation of 4 clusters.
* Pools of 4 classes whose centre geometry maps two classes onto each other's partner: without
  anchors the matching follows the geometry (those two classes swapped); 2 known pairs per
  class repair it, and every mined pair joins the same class; pairs are one-to-one.
* Bad input names the problem.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.objectives.mining import anchor_votes, match_clusters, mine_clusters

F64 = torch.float64


def unit(n: int, d: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64), dim=1)


def test_anchor_votes_count_where_each_pair_falls() -> None:
    ca, cb = unit(3, 5, 0), unit(4, 5, 1)
    xa, xb = unit(20, 5, 2), unit(20, 5, 3)
    expected = torch.zeros(3, 4, dtype=F64)
    for p in range(20):
        expected[int((ca @ xa[p]).argmax()), int((cb @ xb[p]).argmax())] += 1
    torch.testing.assert_close(anchor_votes(xa, xb, ca, cb), expected)
    assert float(anchor_votes(xa[:0], xb[:0], ca, cb).abs().sum()) == 0.0


@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_match_clusters_maximises_cosine_plus_vote_share(weight: float) -> None:
    ca, cb = unit(4, 6, 4), unit(4, 6, 5)
    votes = torch.randint(0, 4, (4, 4), generator=torch.Generator().manual_seed(6)).to(F64)
    share = votes / votes.sum(dim=1, keepdim=True).clamp_min(1.0)
    score = ca @ cb.T + weight * share

    def total(perm: tuple[int, ...]) -> float:
        return float(sum(score[k, m] for k, m in enumerate(perm)))

    best = max(itertools.permutations(range(4)), key=total)
    got = match_clusters(ca, cb, votes, weight)
    assert total(tuple(got.tolist())) == pytest.approx(total(best), abs=1e-12)


CLASSES, PER_CLASS, DIM = 4, 30, 8
SWAP = [1, 0, 2, 3]  # b's class c sits where a's class SWAP[c] sits


def class_pools() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two pools of 4 tight classes; b's classes 0 and 1 sit at each other's place in a's geometry."""
    centres = torch.eye(DIM, dtype=F64)[:CLASSES]
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    a = F.normalize(centres[labels] + 0.15 * torch.randn(len(labels), DIM, generator=g, dtype=F64), dim=1)
    perm = torch.randperm(len(labels), generator=g)
    labels_b = labels[perm]
    where = torch.tensor(SWAP)[labels_b]
    b = F.normalize(centres[where] + 0.15 * torch.randn(len(labels), DIM, generator=g, dtype=F64), dim=1)
    return a, b, labels, labels_b


def anchors(a: Tensor, b: Tensor, labels: Tensor, labels_b: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
    ia = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in range(CLASSES)])
    ib = torch.cat([(labels_b == c).nonzero().flatten()[:per_class] for c in range(CLASSES)])
    return a[ia], b[ib]


def test_known_pairs_repair_a_class_swap_the_geometry_suggests() -> None:
    a, b, labels, labels_b = class_pools()
    plain = mine_clusters(a, b, CLASSES, seed=0)
    same = labels[plain.i] == labels_b[plain.j]
    assert plain.size == len(labels) and float(same.double().mean()) == pytest.approx(0.5)  # classes 0, 1 swapped
    guided = mine_clusters(a, b, CLASSES, *anchors(a, b, labels, labels_b, 2), anchor_weight=2.0, seed=0)
    assert guided.size == len(labels)
    assert bool((labels[guided.i] == labels_b[guided.j]).all())
    assert guided.i.tolist() == sorted(set(guided.i.tolist())) and len(set(guided.j.tolist())) == guided.size
    torch.testing.assert_close(guided.confidence, (a[guided.i] * b[guided.j]).sum(dim=1))
    kept = mine_clusters(a, b, CLASSES, *anchors(a, b, labels, labels_b, 2), anchor_weight=2.0, threshold=0.5)
    assert 0 < kept.size < guided.size and bool((kept.confidence >= 0.5).all())


def test_cluster_mining_rejects_bad_input() -> None:
    a = unit(10, 4, 0)
    with pytest.raises(ValueError, match="clusters"):
        mine_clusters(a, a, 0)
    with pytest.raises(ValueError, match="anchors"):
        mine_clusters(a, a, 2, a[:3], a[:2])
    with pytest.raises(ValueError, match="pools"):
        mine_clusters(a, unit(10, 5, 1), 2)
    assert mine_clusters(a[:0], a, 2).size == 0
