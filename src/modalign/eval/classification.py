"""Classification from frozen embeddings: prototype zero-shot, linear probe and kNN.

* Zero-shot by nearest class prototype, the embedding-space analogue of CLIP's prompt-based
  zero-shot classifier (Radford et al. 2021) and of prototypical networks (Snell et al. 2017).
* Linear probe: logistic regression on standardised frozen features (Radford et al. 2021, §3.2).
* Weighted kNN on cosine similarity (Wu et al. 2018, "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination").

Similarities are computed in ``[chunk_size, gallery_chunk_size]`` blocks (``modalign.eval.blocks``)
with a running argmax (zero-shot over any number of classes) or a running top-k (kNN over any
number of training rows), so memory is flat in the number of prototypes or training rows.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from modalign.eval.blocks import GALLERY_CHUNK_SIZE, RowBlocks, topk_neighbours
from modalign.eval.embed import (
    EvalInputError,
    check_chunk_size,
    check_matrix,
    check_vector,
    l2_normalise,
)


def class_prototypes(emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One prototype per class: the L2-normalised mean of the class's normalised embeddings.

    Args:
        emb: ``Tensor[N, E]`` embeddings.
        labels: ``LongTensor[N]`` class labels (every value, ``-1`` included, is a class; drop
            unknown labels before calling).

    Returns:
        ``(classes LongTensor[C] sorted ascending, prototypes Tensor[C, E] float32)``.

    Raises:
        EvalInputError: If shapes disagree or ``emb`` is empty.
    """
    emb = check_matrix("emb", emb)
    labels = check_vector("labels", labels, emb.shape[0]).to(emb.device)
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(classes.shape[0], emb.shape[1], device=emb.device)
    sums.index_add_(0, inverse, l2_normalise(emb))
    return classes, l2_normalise(sums)


def zero_shot_accuracy(
    query: Tensor,
    query_labels: Tensor,
    prototypes: Tensor,
    classes: Tensor,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
) -> float:
    """Accuracy of assigning each query to its most cosine-similar class prototype.

    Exact ties go to the prototype listed first. A query whose label is not in ``classes``
    always counts as wrong. Prototypes are scanned in blocks with a running maximum, so any
    number of classes fits in ``O(chunk_size x gallery_chunk_size)`` memory.

    Args:
        query: ``Tensor[N, E]``.
        query_labels: ``LongTensor[N]`` true labels.
        prototypes: ``Tensor[C, E]`` (e.g. from ``class_prototypes`` of another modality).
        classes: ``LongTensor[C]`` the label of each prototype.
        chunk_size: Queries per block.
        gallery_chunk_size: Prototypes per block.

    Returns:
        Fraction of correctly classified queries.

    Raises:
        EvalInputError: If shapes disagree.
    """
    query = check_matrix("query", query)
    prototypes = check_matrix("prototypes", prototypes, dim=query.shape[1]).to(query.device)
    classes = check_vector("classes", classes, prototypes.shape[0]).to(query.device)
    labels = check_vector("query_labels", query_labels, query.shape[0]).to(query.device)
    blocks = RowBlocks(prototypes, gallery_chunk_size)
    correct = 0
    for rows, q in RowBlocks(query, check_chunk_size(chunk_size)).blocks():
        best = torch.full((q.shape[0],), float("-inf"), device=q.device)
        pick = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for cols, sims in blocks.scores(q):
            value, index = sims.max(dim=1)  # first maximum of the block
            better = value > best  # strict: an earlier block keeps its tie
            best, pick = torch.where(better, value, best), torch.where(better, index + cols.start, pick)
        correct += int((classes[pick] == labels[rows]).sum())
    return correct / query.shape[0]


def _check_split(x: Tensor, y: Tensor, split: str, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Validate a ``(features, labels)`` split named ``split`` (``"train"`` or ``"test"``)."""
    x = check_matrix(f"{split}_x", x, dim=dim)
    return x, check_vector(f"{split}_y", y, x.shape[0])


def linear_probe_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    max_iter: int = 1000,
    C: float = 1.0,  # noqa: N803 (scikit-learn's name for the inverse regularisation)
    seed: int = 0,
) -> float:
    """Test accuracy of a multinomial logistic regression trained on frozen features.

    Features are standardised with a ``StandardScaler`` fitted on the training split only.

    Args:
        train_x: ``Tensor[N, E]`` training features.
        train_y: ``LongTensor[N]`` training labels (at least two classes).
        test_x: ``Tensor[M, E]`` test features.
        test_y: ``LongTensor[M]`` test labels.
        max_iter: L-BFGS iterations.
        C: Inverse L2 regularisation strength.
        seed: ``random_state`` of the solver.

    Returns:
        Fraction of test rows classified correctly.

    Raises:
        EvalInputError: If shapes disagree or the training split has fewer than two classes.
    """
    train_x, train_y = _check_split(train_x, train_y, "train")
    test_x, test_y = _check_split(test_x, test_y, "test", dim=train_x.shape[1])
    if torch.unique(train_y).numel() < 2:
        raise EvalInputError("train_y: a linear probe needs at least two classes in the training split")
    scaler = StandardScaler().fit(train_x.cpu().numpy().astype(np.float64))
    clf = LogisticRegression(max_iter=max_iter, C=C, random_state=seed)
    clf.fit(scaler.transform(train_x.cpu().numpy().astype(np.float64)), train_y.cpu().numpy())
    pred = clf.predict(scaler.transform(test_x.cpu().numpy().astype(np.float64)))
    return float(np.mean(pred == test_y.cpu().numpy()))


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int = 10,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
) -> Tensor:
    """Majority vote of the ``k`` most cosine-similar training rows of each test row.

    Vote ties are broken by the larger summed similarity of the tied classes, then by the
    smaller label. ``k`` larger than the training split is clipped to its size. Neighbours come
    from ``topk_neighbours`` (a running top-k over training blocks; equal similarities prefer
    the earlier training row).

    Args:
        train_x: ``Tensor[N, E]``.
        train_y: ``LongTensor[N]``.
        test_x: ``Tensor[M, E]``.
        k: Neighbours per test row.
        chunk_size: Test rows per block.
        gallery_chunk_size: Training rows per block.

    Returns:
        ``LongTensor[M]`` predicted labels on the CPU.

    Raises:
        EvalInputError: If shapes disagree or ``k < 1``.
    """
    train_x, train_y = _check_split(train_x, train_y, "train")
    test_x = check_matrix("test_x", test_x, dim=train_x.shape[1])
    if int(k) != k or k < 1:
        raise EvalInputError(f"k: must be a positive integer, got {k!r}")
    k = min(int(k), train_x.shape[0])
    classes, inverse = torch.unique(train_y.to(test_x.device), sorted=True, return_inverse=True)
    top_sims, top_idx = topk_neighbours(test_x, train_x, k, check_chunk_size(chunk_size), gallery_chunk_size)
    votes = torch.zeros(test_x.shape[0], classes.shape[0], dtype=torch.float64, device=test_x.device)
    # votes = count * (2k + 1) + similarity sum: the sums lie in [-k, k], so the count decides
    # and the similarity sum only breaks ties (a class with a neighbour always beats none).
    votes.scatter_add_(1, inverse[top_idx], top_sims.double() + (2 * k + 1))
    return classes[votes.argmax(dim=1)].cpu()


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 10,
    chunk_size: int = 1024,
    gallery_chunk_size: int = GALLERY_CHUNK_SIZE,
) -> float:
    """Test accuracy of cosine kNN majority voting (see ``knn_predict`` for tie rules).

    Args:
        train_x: ``Tensor[N, E]`` training features.
        train_y: ``LongTensor[N]`` training labels.
        test_x: ``Tensor[M, E]`` test features.
        test_y: ``LongTensor[M]`` test labels.
        k: Neighbours per test row.
        chunk_size: Test rows per block.
        gallery_chunk_size: Training rows per block; memory is ``O(chunk_size x gallery_chunk_size)``.

    Returns:
        Fraction of test rows classified correctly.

    Raises:
        EvalInputError: If shapes disagree or ``k < 1``.
    """
    test_x = check_matrix("test_x", test_x)
    test_y = check_vector("test_y", test_y, test_x.shape[0])
    preds = knn_predict(train_x, train_y, test_x, k, chunk_size, gallery_chunk_size)
    return float((preds == test_y.cpu()).double().mean())
