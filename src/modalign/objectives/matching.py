"""Matching objectives: binary classification of matched versus mismatched pairs.

* ``itm``: image-text matching with hard negatives (Li et al. 2021, "Align before Fuse" (ALBEF);
  Li et al. 2022, BLIP), for any two modalities ``A, B`` with token outputs. A fusion encoder
  owned by the objective (``TransformerDecoder(causal=False)``: ``A``'s tokens are the queries
  and cross-attend to ``B``'s tokens) is pooled into a two-way match / no-match classifier. Each
  paired row gives three fused pairs: the true pair, ``A_i`` with a hard negative ``B`` drawn
  from ``softmax(sim(A_i, B_j) / t)`` and a hard negative ``A`` with ``B_i``.
* ``avc``: audio-visual correspondence (Arandjelović & Zisserman 2017, "Look, Listen and Learn"
  (L3-Net)): a small head on the two modalities' vectors classifies true pairs against pairs
  whose ``B`` comes from a random derangement of the batch.

The mathematics is in plain functions (``sample_hard_negatives``, ``shuffled_partners``,
``matching_pairs``, ``itm_loss``, ``avc_loss``); the modules select rows, own the heads and run
them in ``features`` (logits and labels land in ``Outputs.extras``), and ``forward`` computes the
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.distributed import (
    all_gather_no_grad,
    all_gather_sizes,
    all_gather_with_grad,
    is_initialized,
    rank,
    world_size,
)
from modalign.nn.attention import TransformerDecoder
from modalign.nn.layers import masked_mean
from modalign.objectives.contrastive import Gallery, Pair, PairObjective, paired_rows

#: Pooling of the fused query tokens: masked mean, or the first token (``[CLS]``, as ALBEF).
Pool = Literal["mean", "first"]
#: Correspondence head: L3-Net's MLP on the concatenated vectors, or AVE-Net's distance.
CorrespondenceKind = Literal["concat", "distance"]


def _check_mask(sim: Tensor, same: Tensor, name: str) -> None:
    """Validate ``sim: [N, M]`` and ``same: BoolTensor[N, M]``.

    Raises:
        ValueError: Naming the shape or dtype that does not fit.
    """
    if sim.dim() != 2:
        raise ValueError(f"{name}: sim must be [N, M], got shape {tuple(sim.shape)}")
    if same.shape != sim.shape or same.dtype != torch.bool:
        raise ValueError(
            f"{name}: same must be a bool tensor of shape {tuple(sim.shape)}, got {same.dtype} {tuple(same.shape)}"
        )


def sample_hard_negatives(sim: Tensor, same: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one negative column per row, in proportion to ``exp(sim)`` (ALBEF's hard negatives).

    Row ``i`` draws column ``j`` with probability
    ``exp(sim[i, j]) / sum_{k: not same[i, k]} exp(sim[i, k])`` if ``same[i, j]`` is False and 0
    otherwise: columns holding the same content as the row (its own pair included) are never
    drawn. The draw has no gradient (``sim`` is detached) and uses ``generator`` or, when
    ``None``, torch's global RNG (which the trainer seeds per epoch).

    Args:
        sim: ``FloatTensor[N, M]`` similarity logits, already divided by the temperature.
        same: ``BoolTensor[N, M]``, True where row ``i`` and column ``j`` hold the same content.
        generator: Random generator on ``sim``'s device, or ``None``.

    Returns:
        ``LongTensor[N]``: the drawn column of each row, ``-1`` for rows whose every column is
        the same content.

    Raises:
        ValueError: If ``sim`` is not 2-D or ``same`` is not a bool tensor of its shape.
    """
    _check_mask(sim, same, "sample_hard_negatives")
    with torch.no_grad():
        out = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
        valid = (~same).any(dim=1)
        if bool(valid.any()):
            logits = sim.detach().float().masked_fill(same, float("-inf"))[valid]
            drawn = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator)
            out[valid] = drawn.squeeze(1)
    return out


def shuffled_partners(same: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random derangement of the rows that never pairs a row with same-content (L3-Net negatives).

    A uniformly random ``N``-cycle (a random order, each row paired with the next one) is never
    a fixed point, and every row's partner is uniform over the other rows. Rows paired with a
    same-content row (``same[i, p(i)]``) are then repaired by swapping partners with a random
    row ``j`` for which both new pairs are allowed. A row that cannot be repaired gets ``-1``; on
    the rows that keep a partner the map stays one-to-one, so each ``B`` row appears once among
    the negatives, as often as among the positives.

    Args:
        same: ``BoolTensor[N, N]``, True where rows ``i`` and ``j`` hold the same content (the
            diagonal is treated as True).
        generator: A CPU random generator, or ``None`` for torch's global RNG (the draw runs on
            the CPU; the result is moved to ``same``'s device).

    Returns:
        ``LongTensor[N]``: the partner of each row, or ``-1``.

    Raises:
        ValueError: If ``same`` is not a square bool tensor.
    """
    if same.dim() != 2 or same.shape[0] != same.shape[1] or same.dtype != torch.bool:
        raise ValueError(f"shuffled_partners: same must be a square bool tensor, got {same.dtype} {tuple(same.shape)}")
    n = same.shape[0]
    forbid = same.cpu() | torch.eye(n, dtype=torch.bool)
    order = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    rows = torch.arange(n)
    for i in forbid[rows, partner].nonzero().flatten().tolist():
        if not bool(forbid[i, partner[i]]):
            continue  # repaired by an earlier swap
        ok = ~forbid[i, partner] & ~forbid[rows, partner[i]]
        if bool(ok.any()):
            j = int(torch.multinomial(ok.float(), 1, generator=generator).item())
            partner[[i, j]] = partner[[j, i]]
    return partner.masked_fill(forbid[rows, partner], -1).to(same.device)


def matching_pairs(anchors: Tensor, neg_b: Tensor, neg_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gallery rows and labels of ALBEF's three kinds of fused pairs.

    Each anchor row ``r = anchors[i]`` (a gallery row: a local row plus, when gathering, the
    rows of the lower ranks) gives the positive ``(r, r)`` with label 1, and the negatives
    ``(r, neg_b[i])`` and ``(neg_a[i], r)`` with label 0; negatives that are ``-1`` (no
    candidate) are left out.

    Args:
        anchors: ``LongTensor[n]`` gallery rows of the anchor pairs.
        neg_b: ``LongTensor[n]`` gallery row of the negative ``B`` of each anchor's ``A``, or -1.
        neg_a: ``LongTensor[n]`` gallery row of the negative ``A`` of each anchor's ``B``, or -1.

    Returns:
        ``(index_a, index_b, labels)``, each ``LongTensor[P]``: positives first, then the
        ``A``-anchored negatives, then the ``B``-anchored ones.

    Raises:
        ValueError: If the three are not 1-D of the same length.
    """
    if anchors.dim() != 1 or neg_b.shape != anchors.shape or neg_a.shape != anchors.shape:
        raise ValueError(
            f"anchors, neg_b and neg_a must be [n], got {tuple(anchors.shape)}, {tuple(neg_b.shape)}, "
            f"{tuple(neg_a.shape)}"
        )
    keep_b, keep_a = neg_b >= 0, neg_a >= 0
    index_a = torch.cat([anchors, anchors[keep_b], neg_a[keep_a]])
    index_b = torch.cat([anchors, neg_b[keep_b], anchors[keep_a]])
    labels = torch.cat([torch.ones_like(anchors), torch.zeros_like(index_a[anchors.shape[0] :])])
    return index_a, index_b, labels


def _pair_cross_entropy(logits: Tensor, labels: Tensor, gather: bool, name: str) -> Tensor:
    """Mean two-way cross-entropy with the global-mean weighting under gathering (see ``itm_loss``).

    Raises:
        ValueError: On shapes that do not fit, or an empty batch without gathering.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"{name}: logits must be [P, 2], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype != torch.long:
        raise ValueError(
            f"{name}: labels must be a LongTensor [{logits.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    gathering = gather and is_initialized()
    total = sum(all_gather_sizes(logits.shape[0], logits.device)) if gathering else logits.shape[0]
    if total == 0:
        if not gathering:
            raise ValueError(f"{name} got an empty batch (no pairs)")
        return 0.0 * logits.sum()
    weight = world_size() if gathering else 1
    return F.cross_entropy(logits, labels, reduction="sum") * (weight / total)


def itm_loss(logits: Tensor, labels: Tensor, gather: bool = False) -> Tensor:
    """Image-text matching loss: mean cross-entropy of match / no-match logits (ALBEF, BLIP).

    ``L = -1/P sum_p log softmax(logits_p)[labels_p]``. With ``gather=True`` and an initialised
    process group each rank returns ``world_size * sum_local / P_total`` (``P_total`` = pairs over
    all ranks, which may differ per rank), so the mean over ranks is the mean over every rank's
    pairs; the pairs themselves may read other ranks' rows (see ``ImageTextMatching``).

    Args:
        logits: ``Tensor[P, 2]`` (column 1 = "match").
        labels: ``LongTensor[P]``: 1 for a true pair, 0 for a negative.
        gather: Normalise by the pair count over all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``logits`` is not ``[P, 2]``, ``labels`` not ``LongTensor[P]``, or (without
            gathering) ``P = 0``.
    """
    return _pair_cross_entropy(logits, labels, gather, "itm_loss")


def avc_loss(logits: Tensor, labels: Tensor, gather: bool = False) -> Tensor:
    """Audio-visual correspondence loss (L3-Net): mean cross-entropy of correspond / not logits.

    The same two-way cross-entropy as ``itm_loss`` (Arandjelović & Zisserman 2017 train a
    softmax over two classes), with the same weighting under ``gather``.

    Args:
        logits: ``Tensor[P, 2]`` (column 1 = "corresponds").
        labels: ``LongTensor[P]``: 1 for a true pair, 0 for a shuffled one.
        gather: Normalise by the pair count over all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If ``logits`` is not ``[P, 2]``, ``labels`` not ``LongTensor[P]``, or (without
            gathering) ``P = 0``.
    """
    return _pair_cross_entropy(logits, labels, gather, "avc_loss")


def gather_tokens(tokens: Tensor, padding: Tensor, gather: bool) -> tuple[Tensor, Tensor]:
    """Every rank's token rows (with gradient) and padding, padded to the longest sequence.

    Args:
        tokens: ``Tensor[n, T, D]`` this rank's rows.
        padding: ``BoolTensor[n, T]`` (``True`` = padded).
        gather: Gather from all ranks (only with an initialised process group).

    Returns:
        ``(Tensor[M, T', D], BoolTensor[M, T'])`` in rank order, ``T'`` the longest ``T`` of any
        rank (extra positions are padded); the inputs themselves when not gathering.
    """
    if not (gather and is_initialized()):
        return tokens, padding
    sizes = all_gather_sizes(tokens.shape[0], tokens.device)
    extra = max(all_gather_sizes(tokens.shape[1], tokens.device)) - tokens.shape[1]
    tokens = F.pad(tokens, (0, 0, 0, extra))
    padding = torch.cat([padding, padding.new_ones((padding.shape[0], extra))], dim=1)
    return all_gather_with_grad(tokens.contiguous(), sizes), all_gather_no_grad(padding, sizes)


def detached_gallery(pair: Pair, gather: bool) -> Gallery:
    """The (detached) embeddings and ids of this rank's rows, or of every rank's rows when gathering."""
    a, b = pair.a.detach(), pair.b.detach()
    if not (gather and is_initialized()):
        return Gallery(a, b, pair.ids_a, 0, pair.size, 1, pair.ids_b)
    sizes = all_gather_sizes(pair.size, a.device)
    gathered = [all_gather_no_grad(t, sizes) for t in (a, b, pair.ids_a, pair.ids_b)]
    offset = sum(sizes[: rank()])
    return Gallery(gathered[0], gathered[1], gathered[2], offset, sum(sizes), world_size(), gathered[3])


class FusionMatchingHead(nn.Module):
    """ALBEF's multimodal encoder plus ITM head: ``A`` tokens cross-attend to ``B``, pooled, 2 logits.

    ``Linear(dim_a, width)`` on ``A``'s tokens (identity when equal), a bidirectional
    ``TransformerDecoder(width, depth, heads, context_dim=dim_b, causal=False)``, pooling of the
    query tokens (masked mean or first token) and ``Linear(width, 2)``.

    Args:
        dim_a: Width of ``A``'s tokens (the queries).
        dim_b: Width of ``B``'s tokens (the context).
        width: Width of the fusion encoder.
        depth: Number of cross-attention blocks.
        heads: Attention heads (must divide ``width``).
        pool: ``"mean"`` (masked mean) or ``"first"`` (first token).
    """

    def __init__(self, dim_a: int, dim_b: int, width: int, depth: int, heads: int, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.proj: nn.Module = nn.Linear(dim_a, width) if width != dim_a else nn.Identity()
        self.fusion = TransformerDecoder(width, depth, heads, context_dim=dim_b, causal=False)
        self.classifier = nn.Linear(width, 2)

    def forward(self, tokens_a: Tensor, padding_a: Tensor, tokens_b: Tensor, padding_b: Tensor) -> Tensor:
        """Match logits ``Tensor[P, 2]`` of pairs ``(tokens_a [P, T, D_a], tokens_b [P, S, D_b])``.

        Raises:
            ValueError: If token and padding shapes disagree.
        """
        if tokens_a.shape[0] == 0:  # attention rejects empty batches; stay connected (DDP, gathers)
            anchor = tokens_a.sum() + tokens_b.sum() + sum(p.sum() for p in self.parameters())
            return tokens_a.new_zeros((0, 2)) + 0.0 * anchor
        x = self.fusion(self.proj(tokens_a), tokens_b, padding_a, padding_b)
        pooled = x[:, 0] if self.pool == "first" else masked_mean(x, padding_a)
        return self.classifier(pooled)


def _paddings(outputs: Outputs, modalities: tuple[str, str]) -> dict[str, Tensor]:
    """``{m: BoolTensor[B, T]}`` token padding of each modality (all valid where none is given)."""
    pads = {}
    for m in modalities:
        if m in outputs.tokens:
            tokens = outputs.tokens[m]
            pads[m] = outputs.padding.get(m, torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
    return pads


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((logits.argmax(dim=1) == labels).float().mean().item())


def module_width(model: nn.Module, group: str, modality: str, attr: str) -> int:
    """``model.<group>[modality].<attr>``: an encoder's token width ``dim``, a head's ``out_dim``.

    Raises:
        ConfigError: If the model has no such module or it has no integer ``attr``.
    """
    modules = getattr(model, group, {})
    value = getattr(modules[modality], attr, None) if modality in modules else None
    if not isinstance(value, int):
        raise ConfigError("modalities", f"the model's {group}[{modality!r}] has no integer width {attr!r}")
    return value


def _check_positive(**values: float) -> None:
    """Raise ``ConfigError`` for the first value that is not > 0."""
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")


@register("objective", "itm")
class ImageTextMatching(PairObjective):
    """Matching with hard negatives between modalities ``A, B`` (ALBEF/BLIP ITM), with its fusion head.

    ``bind`` builds a ``FusionMatchingHead`` from the encoders' token widths
    (``model.encoders[m].dim``). ``features`` takes the rows where both modalities are present
    and, for each, fuses three pairs (``3P`` in total, as ALBEF): ``(A_i, B_i)`` labelled 1,
    ``(A_i, B_j)`` with ``j ~ softmax_j(a_i . b_j / t)`` and ``(A_k, B_i)`` with
    ``k ~ softmax_k(b_i . a_k / t)``, both labelled 0, where ``a, b`` are ``outputs.embeddings``
    (detached: no gradient through the sampling) and rows holding the same content as row ``i``
    (``batch.ids_of`` of either modality) are never drawn (``sample_hard_negatives``). The
    logits, labels and the gallery rows of each pair land in ``outputs.extras``; ``forward`` is
    ``itm_loss``. Gradients reach the head and both towers' tokens.

    Distributed scheme (``gather=True`` under a process group, BLIP's ``negative_all_rank``): the
    embeddings and ids of every rank are gathered without gradient to sample negatives from the
    global batch, and both modalities' tokens (padded to the longest sequence) are gathered with
    gradient (``all_gather_with_grad``), so a negative drawn from another rank trains that rank's
    tower too. Each rank fuses the three pairs of its own rows; ``itm_loss`` weights them so that
    the mean over ranks is the mean over all pairs, and the per-rank gradients averaged by DDP
    equal the single-process gradients of the same pairs.

    Args:
        modalities: ``[A, B]``: ``A``'s tokens are the fusion queries (text in ALBEF), ``B``'s the
            context (image). Default: the model's two, sorted.
        depth: Cross-attention blocks of the fusion encoder.
        heads: Attention heads (must divide the width).
        width: Fusion width (default: ``A``'s token width; otherwise ``A``'s tokens are projected).
        pool: Pooling of the fused query tokens: ``mean`` (masked mean) or ``first``.
        temperature: Temperature ``t`` of the sampling softmax (ALBEF samples with the ITC temperature).
        hard_negatives: Sample negatives by similarity; ``False`` draws them uniformly among the
            other-content rows (an ablation).
        max_rows: Fuse the pairs of at most this many randomly chosen paired rows per batch (and
            rank), ``3 * max_rows`` pairs, to bound the fusion encoder's cost; their negatives
            are still drawn from every row. ``None``: every row (ALBEF).
        gather: Draw negatives from every rank's rows and normalise over all ranks' pairs.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        depth: int = 1,
        heads: int = 4,
        width: int | None = None,
        pool: Pool = "mean",
        temperature: float = 0.07,
        hard_negatives: bool = True,
        max_rows: int | None = None,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "itm")
        sizes = {k: v for k, v in {"width": width, "max_rows": max_rows}.items() if v is not None}
        _check_positive(depth=depth, heads=heads, temperature=temperature, **sizes)
        self.max_rows = max_rows
        self.depth, self.heads, self.width, self.pool = depth, heads, width, pool
        self.temperature = temperature
        self.hard_negatives = hard_negatives
        self.gather = gather
        self.head: FusionMatchingHead | None = None

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and build the fusion head from the encoders' token widths.

        Raises:
            ConfigError: If a modality is unknown or ``heads`` does not divide the width.
        """
        super().bind(model)
        a, b = self.modalities
        dim_a, dim_b = (module_width(model, "encoders", m, "dim") for m in (a, b))
        width = self.width or dim_a
        if width % self.heads != 0:
            raise ConfigError("heads", f"must divide the fusion width {width}, got {self.heads}")
        if self.head is None:
            self.head = FusionMatchingHead(dim_a, dim_b, width, self.depth, self.heads, self.pool)

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Fuse the true pairs and the sampled negatives: ``logits [P, 2]``, ``labels``, ``index_a``, ``index_b``.

        ``index_a``/``index_b`` (``LongTensor[P]``) are the pairs' rows in the gallery of paired
        rows (every rank's, in rank order, when gathering).

        Raises:
            ValueError: If the objective was not bound to a model.
        """
        if self.head is None:
            raise ValueError("itm: bind(model) must run before features (Method does it)")
        tokens = paired_rows(outputs.tokens, batch, self.modalities)
        embeddings = paired_rows(outputs.embeddings, batch, self.modalities)
        if tokens is None or embeddings is None:
            return {}
        padding = paired_rows(_paddings(outputs, self.modalities), batch, self.modalities)
        assert padding is not None  # _paddings has every modality that has tokens
        tokens_a, padding_a = gather_tokens(tokens.a, padding.a, self.gather)
        tokens_b, padding_b = gather_tokens(tokens.b, padding.b, self.gather)
        index_a, index_b, labels = self.sample_pairs(embeddings)
        logits = self.head(tokens_a[index_a], padding_a[index_a], tokens_b[index_b], padding_b[index_b])
        return {"logits": logits, "labels": labels, "index_a": index_a, "index_b": index_b}

    def sample_pairs(self, embeddings: Pair) -> tuple[Tensor, Tensor, Tensor]:
        """Anchors and their hard negatives as gallery rows: ``matching_pairs``'s ``(index_a, index_b, labels)``.

        Args:
            embeddings: This rank's paired rows of ``outputs.embeddings`` with their ids.
        """
        gallery = detached_gallery(embeddings, self.gather)
        n, device = embeddings.size, gallery.a.device
        same = gallery.same_id(embeddings.ids_a, n, device, embeddings.ids_b)
        anchors = torch.arange(n, device=device)
        if self.max_rows is not None and n > self.max_rows:
            anchors = torch.randperm(n, device=device)[: self.max_rows].sort().values
        scale = 1.0 / self.temperature if self.hard_negatives else 0.0
        neg_b = sample_hard_negatives(scale * embeddings.a.detach()[anchors] @ gallery.b.T, same[anchors])
        neg_a = sample_hard_negatives(scale * embeddings.b.detach()[anchors] @ gallery.a.T, same[anchors])
        return matching_pairs(anchors + gallery.offset, neg_b, neg_a)

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """``itm_loss`` of the fused pairs; metrics: ``acc`` (of the pairs), ``pairs``."""
        return _matching_output(self, outputs, itm_loss, self.gather)


class CorrespondenceHead(nn.Module):
    """Two-way "corresponds / does not" classifier of two vectors.

    * ``concat`` (L3-Net, Arandjelović & Zisserman 2017): ``Linear(E_a + E_b, hidden) -> ReLU
      -> Linear(hidden, 2)`` on the concatenation; the towers need not share a space.
    * ``distance`` (AVE-Net, Arandjelović & Zisserman 2018, "Objects that Sound"):
      ``Linear(1, 2)`` on the Euclidean distance ``d = ||a - b||``, which forces a shared
      space; initialised to ``logit(match) - logit(no match) = 10 (1 - d)`` (for unit vectors,
      ``d`` is in ``[0, 2]``, ``sqrt(2)`` when orthogonal).

    Args:
        kind: ``concat`` or ``distance``.
        dim_a: Width of ``a``.
        dim_b: Width of ``b``.
        hidden: Hidden width of the ``concat`` MLP.
    """

    def __init__(self, kind: CorrespondenceKind, dim_a: int, dim_b: int, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "concat":
            self.net = nn.Sequential(nn.Linear(dim_a + dim_b, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        else:  # PyTorch's default init of Linear(1, 2) gives a slope below 2 over d in [0, 2]
            linear = nn.Linear(1, 2)
            with torch.no_grad():
                linear.weight.copy_(torch.tensor([[5.0], [-5.0]]))
                linear.bias.copy_(torch.tensor([-5.0, 5.0]))
            self.net = nn.Sequential(linear)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Logits ``Tensor[P, 2]`` of the pairs ``(a [P, E_a], b [P, E_b])``."""
        if self.kind == "concat":
            return self.net(torch.cat([a, b], dim=1))
        return self.net((a - b).norm(dim=1, keepdim=True))


@register("objective", "avc")
class AudioVisualCorrespondence(PairObjective):
    """Audio-visual correspondence (L3-Net, Arandjelović & Zisserman 2017) between modalities ``A, B``.

    ``features`` takes the rows where both are present and classifies ``P`` true pairs
    ``(a_i, b_i)`` (label 1) against ``P`` mismatched pairs ``(a_i, b_p(i))`` (label 0), ``p`` a
    random derangement of the local rows that never pairs same-content rows
    (``shuffled_partners``, ``batch.ids_of`` of either modality). With ``head="concat"`` it
    reads ``outputs.projections`` (the raw head outputs, as L3-Net's fusion reads the towers'
    features); with ``head="distance"`` the L2-normalised ``outputs.embeddings`` (AVE-Net).

    On av-digits a shuffled partner is a recording of the same digit about one time in ten: for
    AVC it is a negative all the same (only the true pairing is positive), which is the method; class
    structure must come from the towers telling pairs apart.

    Under ``gather=True`` the negatives still come from the local batch (as each L3-Net worker
    shuffles its own batch); only the weighting of ``avc_loss`` is global, so the mean over ranks
    is the mean over every rank's pairs.

    Args:
        modalities: ``[A, B]`` (default: the model's two, sorted).
        head: ``concat`` (L3-Net MLP) or ``distance`` (AVE-Net).
        hidden: Hidden width of the ``concat`` MLP (L3-Net: 128).
        gather: Normalise over all ranks' pairs.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        head: CorrespondenceKind = "concat",
        hidden: int = 128,
        gather: bool = False,
    ) -> None:
        super().__init__(modalities, "avc")
        _check_positive(hidden=hidden)
        self.kind: CorrespondenceKind = head
        self.hidden = hidden
        self.gather = gather
        self.head: CorrespondenceHead | None = None

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities and build the head (``concat``: from the projection heads' ``out_dim``).

        Raises:
            ConfigError: If a modality is unknown or (``concat``) a projection head has no ``out_dim``.
        """
        super().bind(model)
        dims = [module_width(model, "heads", m, "out_dim") if self.kind == "concat" else 0 for m in self.modalities]
        if self.head is None:
            self.head = CorrespondenceHead(self.kind, dims[0], dims[1], self.hidden)

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Classify true and shuffled pairs: ``logits [P', 2]``, ``labels``, ``index_a``, ``index_b``.

        Raises:
            ValueError: If the objective was not bound to a model.
        """
        if self.head is None:
            raise ValueError("avc: bind(model) must run before features (Method does it)")
        vectors = outputs.projections if self.kind == "concat" else outputs.embeddings
        pair = paired_rows(vectors, batch, self.modalities)
        if pair is None:
            return {}
        local = Gallery(pair.a, pair.b, pair.ids_a, 0, pair.size, 1, pair.ids_b)
        partner = shuffled_partners(local.same_id(pair.ids_a, pair.size, pair.a.device, pair.ids_b))
        rows = torch.arange(pair.size, device=pair.a.device)
        keep = partner >= 0
        index_a, index_b = torch.cat([rows, rows[keep]]), torch.cat([rows, partner[keep]])
        labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows[keep])])
        logits = self.head(pair.a[index_a], pair.b[index_b])
        return {"logits": logits, "labels": labels, "index_a": index_a, "index_b": index_b}

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """``avc_loss`` of the true and shuffled pairs; metrics: ``acc``, ``pairs``."""
        return _matching_output(self, outputs, avc_loss, self.gather)


def _matching_output(
    objective: ImageTextMatching | AudioVisualCorrespondence,
    outputs: Outputs,
    loss_fn: Callable[[Tensor, Tensor, bool], Tensor],
    gather: bool,
) -> LossOutput:
    """The loss of the logits and labels ``features`` stored, or a connected zero without any."""
    logits = outputs.extras.get(objective.key("logits"))
    labels = outputs.extras.get(objective.key("labels"))
    if logits is None or labels is None:
        return LossOutput(loss=outputs.zero(*objective.parameters()), metrics={"pairs": 0.0})
    metrics = {"pairs": float(logits.shape[0])}
    if logits.shape[0] == 0 and not (gather and is_initialized()):
        return LossOutput(loss=outputs.zero(logits, *objective.parameters()), metrics=metrics)
    if logits.shape[0] > 0:
        metrics["acc"] = _accuracy(logits, labels)
    return LossOutput(loss=loss_fn(logits, labels, gather), metrics=metrics)
