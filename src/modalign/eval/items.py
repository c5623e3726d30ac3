"""Distinct items of a paired evaluation split: the galleries of the retrieval protocol.

A split holds one row per *pair*, and one item may sit in several pairs: five captions of one
photo (COCO, Flickr30k; a manifest expresses it with five rows sharing an id) repeat the photo
five times, and av-digits pairs each of its 300 test recordings with about 33 images. Retrieval
ranks **distinct items**: a gallery holding a photo five times would rank every wrong photo five
times ahead of the right one.

* **Identity.** Two rows hold the same item of modality ``m`` when their content ids of ``m``
  are equal (``EmbeddingSet.content_of``: the dataset's ``Sample.modality_ids``, else the sample
  id). ``distinct_rows`` keeps the first row of each item; rows of one item are assumed to hold
  the same embedding (the same input through the same encoder).
* **Relevance.** A query item and a gallery item are relevant to each other when their rows are
  connected through shared sample ids or shared content (of either modality), transitively
  (``item_groups``). For the layouts datasets produce, one item of one modality paired with
  several of the other (captions of a photo, images of a recording), that is exactly "paired
  in some row".
"""

from __future__ import annotations

import torch
from torch import Tensor

from modalign.eval.embed import EvalInputError


def _smallest_per_key(inverse: Tensor, values: Tensor, fill: int) -> Tensor:
    """``LongTensor[K]``: the smallest of ``values [N]`` over the rows of each key.

    ``inverse`` (``LongTensor[N]``) is ``torch.unique``'s index of each row's key.
    """
    low = torch.full((int(inverse.max()) + 1,), fill, dtype=torch.long)
    return low.scatter_reduce(0, inverse, values, reduce="amin")


def distinct_rows(content: Tensor) -> Tensor:
    """The first row of each distinct content id, in row order.

    Args:
        content: ``LongTensor[N]`` content ids of one modality's rows.

    Returns:
        ``LongTensor[D]`` row indices, ascending, one per distinct id (``D <= N``).

    Raises:
        EvalInputError: If ``content`` is not a non-empty 1-D integer tensor.
    """
    if content.ndim != 1 or content.shape[0] == 0 or content.is_floating_point():
        shape = tuple(content.shape)
        raise EvalInputError(f"content ids: expected a non-empty LongTensor[N], got {content.dtype} {shape}")
    n = int(content.shape[0])
    inverse = torch.unique(content.cpu(), return_inverse=True)[1]
    return _smallest_per_key(inverse, torch.arange(n), n).sort().values


def item_groups(ids: Tensor, *content: Tensor) -> Tensor:
    """Relevance groups: rows linked by an equal sample id or an equal content id, transitively.

    Connected components of the graph whose edges join rows sharing any of the keys, found by
    propagating the smallest row index along each key until nothing changes (a few passes for
    one-to-many layouts; at most the component's diameter). Memory ``O(N)``.

    Args:
        ids: ``LongTensor[N]`` sample ids.
        *content: ``LongTensor[N]`` content ids of each modality of the pair.

    Returns:
        ``LongTensor[N]``: the smallest row index of each row's group (equal = relevant).

    Raises:
        EvalInputError: If there are no rows or a key vector's length differs from ``ids``.
    """
    n = int(ids.shape[0])
    keys = [ids.cpu().long(), *(c.cpu().long() for c in content)]
    if n == 0 or any(k.shape != (n,) for k in keys):
        shapes = [tuple(k.shape) for k in keys]
        raise EvalInputError(f"item_groups: every key must be a non-empty LongTensor[{n}], got {shapes}")
    inverses = [torch.unique(k, return_inverse=True)[1] for k in keys]
    group = torch.arange(n)
    while True:
        before = group
        for inverse in inverses:
            group = _smallest_per_key(inverse, group, n)[inverse]
        group = group[group]  # jump to the root's label: fewer passes on long chains
        if torch.equal(group, before):
            return group
