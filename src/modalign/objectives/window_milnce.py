"""MIL-NCE over temporal windows, for two streams that are only loosely aligned in time.

Miech et al. 2020 ("End-to-End Learning of Visual Representations from Uncurated Instructional
Videos", CVPR) pair a video clip with a *bag* of narrations spoken near it, since speech and
action are not synchronised. Here the same idea is applied between the token sequences of two
modalities of one sample (accelerometer and gyroscope windows, audio and video frames):

* ``temporal_windows``: each sequence's tokens are averaged over windows of ``window`` tokens
  taken every ``stride`` tokens (padded tokens left out), and each window gets its centre as a
  fraction of the sequence's valid length, so two streams of different rates or lengths are
  compared on one time axis.
* ``window_bags``: a window of ``a`` owns as positives the windows of the *same sample's* ``b``
  whose centres lie within ``radius`` of its own (and always the nearest one); symmetrically
  for ``b``. Windows of the other samples are negatives, except those of samples holding the
  same content (never negatives).
* ``window_milnce_loss``: ``milnce_loss``'s bag NCE in both directions over all windows of the
  batch: ``(P W_a) x (P W_b)`` logits.

``window_milnce`` (registered) reads ``Outputs.tokens`` through its own ``TokenProjection``,
like the other token objectives, so pair it with ``infonce`` when retrieval on the pooled
embeddings matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.objectives.token_alignment import TokenObjective
from modalign.objectives.unaligned import bag_nce, check_arg, pair_metrics, scale_of, top1_fraction


def temporal_windows(tokens: Tensor, padding: Tensor, window: int, stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-pooled windows of a batch of token sequences, with their centres in ``[0, 1]``.

    Window ``k`` covers token positions ``[k stride, k stride + window)`` of the padded length
    ``T`` (``K = max(1, ceil((T - window) / stride) + 1)`` windows, the last one clipped at ``T``);
    its embedding is the mean of its valid tokens, and its centre is the mean position of those
    tokens plus one half, divided by the row's valid length. A window without a valid token is
    invalid.

    Args:
        tokens: ``Tensor[P, T, E]``.
        padding: ``BoolTensor[P, T]`` (True = padded).
        window: Tokens per window (>= 1).
        stride: Tokens between window starts (>= 1).

    Returns:
        ``(windows Tensor[P, K, E] L2-normalised, centres Tensor[P, K], valid BoolTensor[P, K])``.

    Raises:
        ValueError: On shapes that do not fit, or ``window``/``stride`` below 1.
    """
    if tokens.dim() != 3 or padding.shape != tokens.shape[:2]:
        raise ValueError(
            f"tokens [P, T, E] and padding [P, T] expected, got {tuple(tokens.shape)}, {tuple(padding.shape)}"
        )
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    t = tokens.shape[1]
    k = max(1, -(-(t - window) // stride) + 1)
    position = torch.arange(t, device=tokens.device)
    start = torch.arange(k, device=tokens.device)[:, None] * stride
    member = (position[None, :] >= start) & (position[None, :] < start + window)  # [K, T]
    weight = (member[None, :, :] & ~padding[:, None, :]).to(tokens.dtype)  # [P, K, T]
    count = weight.sum(dim=2)
    valid = count > 0
    means = weight @ tokens / count.clamp_min(1.0)[..., None]
    length = (~padding).sum(dim=1, keepdim=True).clamp_min(1).to(tokens.dtype)
    centres = ((weight * position.to(tokens.dtype)).sum(dim=2) / count.clamp_min(1.0) + 0.5) / length
    return F.normalize(means, dim=-1), centres, valid


def window_bags(centres_a: Tensor, valid_a: Tensor, centres_b: Tensor, valid_b: Tensor, radius: float) -> Tensor:
    """``BoolTensor[P K_a, P K_b]``: window ``(p, k)`` of ``a`` owns window ``(p, l)`` of ``b``.

    Owned: same sample ``p``, both valid, and ``|centre_a - centre_b| <= radius`` or ``l`` is the
    nearest valid ``b`` window of ``p`` to ``k`` (so a valid anchor always has a positive, when
    its sample has a valid ``b`` window). Invalid windows own nothing.
    """
    p, ka = centres_a.shape
    kb = centres_b.shape[1]
    gap = (centres_a[:, :, None] - centres_b[:, None, :]).abs()  # [P, K_a, K_b]
    both = valid_a[:, :, None] & valid_b[:, None, :]
    gap = gap.masked_fill(~both, float("inf"))
    nearest = F.one_hot(gap.argmin(dim=2), kb).bool() & both
    own = ((gap <= radius) | nearest) & both
    same = torch.eye(p, dtype=torch.bool, device=own.device)
    return (same[:, None, :, None] & own[:, :, None, :]).reshape(p * ka, p * kb)


def _excluded(valid_a: Tensor, valid_b: Tensor, ids_a: Tensor | None, ids_b: Tensor | None) -> Tensor:
    """``BoolTensor[P K_a, P K_b]``: window pairs left out of the denominators.

    Either window invalid, or the windows of two different samples holding the same content.
    """
    p, ka, kb = valid_a.shape[0], valid_a.shape[1], valid_b.shape[1]
    blocked = torch.zeros(p, p, dtype=torch.bool, device=valid_a.device)
    for ids in (ids_a, ids_b):
        if ids is not None:
            blocked = blocked | (ids[:, None] == ids[None, :])
    blocked = blocked & ~torch.eye(p, dtype=torch.bool, device=valid_a.device)
    excluded = blocked[:, None, :, None].expand(p, ka, p, kb).reshape(p * ka, p * kb)
    return excluded | ~valid_a.reshape(-1)[:, None] | ~valid_b.reshape(-1)[None, :]


def window_milnce_loss(
    a: Tensor,
    a_padding: Tensor,
    b: Tensor,
    b_padding: Tensor,
    logit_scale: Tensor,
    window: int,
    stride: int,
    radius: float,
    ids_a: Tensor | None = None,
    ids_b: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric MIL-NCE between the temporal windows of paired token sequences.

    With ``l = exp(logit_scale) * A @ B.T`` over all valid windows ``A [P K_a, E]`` and
    ``B [P K_b, E]`` (``temporal_windows``), anchor window ``i`` of ``a`` scores
    ``LSE_j l_ij - LSE_{j in bag(i)} l_ij`` with ``bag`` from ``window_bags``, the denominator
    running over every window not of another sample with the same content (``ids_a``/``ids_b``);
    the ``b -> a`` direction likewise with the ``b`` windows' own bags. The loss is the mean of
    the two directions' means over their valid anchors with a positive.

    Args:
        a: ``Tensor[P, T, E]`` tokens of the first modality (row ``p`` paired with ``b``'s row ``p``).
        a_padding: ``BoolTensor[P, T]``.
        b: ``Tensor[P, S, E]`` tokens of the second modality.
        b_padding: ``BoolTensor[P, S]``.
        logit_scale: Scalar tensor, the log of the inverse temperature.
        window: Tokens per window.
        stride: Tokens between window starts.
        radius: Largest centre distance (fraction of the sequence) of a positive.
        ids_a: ``LongTensor[P]`` content ids of the ``a`` rows, or ``None``.
        ids_b: ``LongTensor[P]`` content ids of the ``b`` rows, or ``None``.

    Returns:
        ``(loss, logits [P K_a, P K_b], positives [P K_a, P K_b])``; logits are ``-inf`` where
        either window is invalid or the windows' samples share a content (other samples only).

    Raises:
        ValueError: On shapes that do not fit, or no anchor with a positive.
    """
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a [P, T, E] and b [P, S, E] must share P and E, got {tuple(a.shape)}, {tuple(b.shape)}")
    wa, ca, va = temporal_windows(a, a_padding, window, stride)
    wb, cb, vb = temporal_windows(b, b_padding, window, stride)
    p, ka, kb = a.shape[0], wa.shape[1], wb.shape[1]
    positive = window_bags(ca, va, cb, vb, radius)
    reverse = window_bags(cb, vb, ca, va, radius).T
    excluded = _excluded(va, vb, ids_a, ids_b)
    logits = (scale_of(logit_scale) * wa.reshape(p * ka, -1) @ wb.reshape(p * kb, -1).T).masked_fill(
        excluded, float("-inf")
    )
    rows, cols = positive.any(dim=1), reverse.any(dim=0)
    if not bool(rows.any()) or not bool(cols.any()):
        raise ValueError("window_milnce_loss: no window has a positive (every sequence fully padded?)")
    loss = 0.5 * (bag_nce(logits[rows], positive[rows]) + bag_nce(logits.T[cols], reverse.T[cols]))
    return loss, logits, positive


@register("objective", "window_milnce")
class WindowMILNCE(TokenObjective):
    """MIL-NCE between temporal windows of two modalities' tokens (see ``window_milnce_loss``).

    A ``TokenObjective`` (its own ``TokenProjection`` of the paired rows' ``outputs.tokens``)
    whose loss is over windows, not a ``[P, P]`` score. Fewer than two paired rows give a zero
    loss connected to the graph. Under data parallelism each rank contrasts its own batch's
    windows (not gathered, like the other token objectives). Memory: ``(P K_a) x (P K_b)`` logits.

    Args:
        modalities: Two modality names (default: the model's two).
        temperature: Initial temperature.
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        dim: Width of the projected tokens (default: the model's embedding width).
        window: Tokens per window (>= 1).
        stride: Tokens between window starts (>= 1).
        radius: Largest centre distance of a positive, as a fraction of the sequence (>= 0):
            at least the largest expected offset between the streams.
    """

    def __init__(
        self,
        modalities: list[str] | None = None,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        dim: int | None = None,
        window: int = 4,
        stride: int = 2,
        radius: float = 0.25,
    ) -> None:
        super().__init__(modalities, "window_milnce", temperature, learn_temperature, max_logit_scale, dim)
        check_arg("window", window >= 1, f"must be >= 1, got {window}")
        check_arg("stride", stride >= 1, f"must be >= 1, got {stride}")
        check_arg("radius", radius >= 0, f"must be >= 0, got {radius}")
        self.window, self.stride, self.radius = window, stride, radius

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """The loss; metrics ``temperature``, ``paired``, ``acc_a2b`` (top-1 window lands in its bag)."""
        scale = self.scale()
        pair = self.project(outputs, batch, self.modalities)
        metrics = pair_metrics(scale, pair.a.shape[0] if pair is not None else 0)
        if pair is None or pair.a.shape[0] < 2:
            return LossOutput(loss=outputs.zero(scale, *self.project.parameters()), metrics=metrics)
        loss, logits, positive = window_milnce_loss(
            pair.a,
            pair.a_padding,
            pair.b,
            pair.b_padding,
            scale,
            self.window,
            self.stride,
            self.radius,
            pair.ids_a,
            pair.ids_b,
        )
        rows = positive.any(dim=1)
        metrics["acc_a2b"] = top1_fraction(logits[rows], positive[rows])
        return LossOutput(loss=loss, metrics=metrics)
