"""Momentum contrast across modalities: an EMA teacher and queues of its embeddings (MoCo / ALBEF ITC).

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning" (MoCo);
the cross-modal form with one queue per modality is ALBEF's image-text contrastive loss (Li et
al. 2021, "Align before Fuse"). Queries are the student's embeddings; keys come from a
momentum (EMA) copy of the model; each query's negatives are the batch's keys plus a queue of
keys from earlier steps, so a small batch still sees many negatives.

``queue_infonce_loss`` is the maths (one direction); ``MoCo`` owns the teacher, the queues and
the temperature, runs the teacher in ``features`` and updates teacher and queues in
``after_step``. Teacher weights and queues are buffers/parameters, so they are checkpointed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs, StepContext
from modalign.distributed import all_gather_no_grad, all_gather_sizes, is_initialized, rank, world_size
from modalign.objectives.contrastive import LogitScale, PairObjective, paired_rows


def queue_infonce_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    logit_scale: Tensor,
    ids: Tensor | None = None,
    queue_ids: Tensor | None = None,
    gather: bool = False,
    teacher_q: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """InfoNCE of queries against their keys, the other rows' keys and a queue of older keys.

    ``logits_i = exp(logit_scale) * q_i @ [k; queue]^T``, target ``i``. Keys and queue entries
    holding the query's content (equal ``ids``/``queue_ids``, other than its own key) are left
    out of the softmax. Keys carry no gradient (they come from the teacher); with ``gather`` and
    a process group every rank's keys are negatives too (MoCo's global batch), the target is
    offset by the lower ranks' rows, and each rank returns ``world_size * sum_local / N_total``
    so the mean over ranks is the loss of the global batch.

    Momentum distillation (ALBEF, Li et al. 2021): with ``alpha > 0`` the one-hot target becomes
    ``alpha * softmax(teacher_q @ [k; queue]^T) + (1 - alpha) * onehot``, so the teacher's view of
    which keys also match a query softens the penalty on plausible "negatives".

    Args:
        q: ``Tensor[N, E]`` L2-normalised queries (student).
        k: ``Tensor[N, E]`` L2-normalised keys of the same rows (teacher).
        queue: ``Tensor[K, E]`` L2-normalised older keys.
        logit_scale: Scalar log inverse temperature.
        ids: ``LongTensor[N]`` content ids of the key rows, or ``None`` (all distinct).
        queue_ids: ``LongTensor[K]`` content ids of the queue (``-1`` = unknown), or ``None``.
        gather: Use every rank's keys as negatives.
        teacher_q: ``Tensor[N, E]`` the teacher's embeddings of the queries' rows (for ``alpha``).
        alpha: Weight of the teacher's soft targets (0: plain InfoNCE).

    Returns:
        Scalar loss.

    Raises:
        ValueError: If shapes disagree or the batch is empty without gathering.
    """
    if q.dim() != 2 or q.shape != k.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"expected q, k [N, E] and queue [K, E]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
        )
    n = q.shape[0]
    offset, keys, key_ids, total, weight = _gather_keys(k.detach(), ids, gather)
    if total == 0 or n == 0:
        if not (gather and is_initialized()):
            raise ValueError("queue_infonce_loss got an empty batch")
        return 0.0 * (q.sum() + logit_scale.sum())
    targets = torch.arange(n, device=q.device) + offset
    scale, gallery = logit_scale.reshape(()).exp(), torch.cat([keys, queue.detach()])
    same = _same_content(ids, key_ids, queue_ids, targets, gallery.shape[0])
    logits = (scale * q @ gallery.T).masked_fill(same, float("-inf"))
    if teacher_q is None or alpha == 0.0:
        return F.cross_entropy(logits, targets, reduction="sum") * (weight / total)
    soft = _soft_targets(scale.detach() * teacher_q.detach() @ gallery.T, same, targets, alpha)
    log_p = F.log_softmax(logits, dim=1).masked_fill(same, 0.0)
    return -(soft * log_p).sum() * (weight / total)


def _gather_keys(k: Tensor, ids: Tensor | None, gather: bool) -> tuple[int, Tensor, Tensor | None, int, int]:
    """``(offset, keys, key_ids, total, weight)``: the local keys, or every rank's with ``gather``."""
    n = k.shape[0]
    if not (gather and is_initialized()):
        return 0, k, ids, n, 1
    sizes = all_gather_sizes(n, k.device)
    key_ids = all_gather_no_grad(ids, sizes) if ids is not None else None
    return sum(sizes[: rank()]), all_gather_no_grad(k, sizes), key_ids, sum(sizes), world_size()


def _soft_targets(teacher_logits: Tensor, same: Tensor, targets: Tensor, alpha: float) -> Tensor:
    """``alpha * softmax(teacher) + (1 - alpha) * onehot(targets)``; same-content entries get 0."""
    soft = F.softmax(teacher_logits.masked_fill(same, float("-inf")), dim=1)
    return alpha * soft + (1.0 - alpha) * F.one_hot(targets, teacher_logits.shape[1]).to(soft.dtype)


def _same_content(
    ids: Tensor | None, key_ids: Tensor | None, queue_ids: Tensor | None, targets: Tensor, width: int
) -> Tensor:
    """``BoolTensor[N, width]``: gallery entries (keys then queue) holding a query's content, target excluded."""
    if ids is None or key_ids is None:
        return torch.zeros(targets.shape[0], width, dtype=torch.bool, device=targets.device)
    same = torch.cat([ids[:, None] == key_ids[None, :], _queue_same(ids, queue_ids, width - key_ids.shape[0])], dim=1)
    same[torch.arange(targets.shape[0], device=targets.device), targets] = False
    return same


def _queue_same(ids: Tensor, queue_ids: Tensor | None, size: int) -> Tensor:
    if queue_ids is None:
        return torch.zeros(ids.shape[0], size, dtype=torch.bool, device=ids.device)
    return ids[:, None] == queue_ids[None, :]


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for every floating parameter (buffers are the teacher's own)."""
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


@register("objective", "moco")
class MoCo(PairObjective):
    """Cross-modal momentum contrast with one queue per modality (MoCo; ALBEF's ITC).

    ``bind`` copies the model into a frozen teacher. ``features`` embeds the batch with the
    teacher (no gradient) into ``extras``; the loss is the mean of both directions of
    ``queue_infonce_loss`` (student a vs teacher b keys + b's queue, and the reverse).
    ``after_step`` moves the teacher towards the student with ``momentum`` and enqueues the
    step's keys (gathered from all ranks with ``gather``), overwriting the oldest.

    Args:
        modalities: Two modality names (default: the model's two).
        queue_size: Keys kept per modality (ALBEF: 65 536; small data wants fewer).
        momentum: EMA coefficient of the teacher (ALBEF: 0.995).
        temperature: Initial temperature (ALBEF: 0.07, learnt).
        learn_temperature: Train the temperature.
        max_logit_scale: Clamp on ``1/temperature``.
        gather: Use every rank's keys as negatives and enqueue them.
        distill: Momentum distillation weight ``alpha`` (ALBEF: 0.4; 0 disables it).
    """

    queue_ptr: Tensor

    def __init__(
        self,
        modalities: list[str] | None = None,
        queue_size: int = 4096,
        momentum: float = 0.995,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        gather: bool = False,
        distill: float = 0.0,
    ) -> None:
        super().__init__(modalities, "moco")
        if not 0.0 <= distill <= 1.0:
            raise ConfigError("distill", f"must be in [0, 1], got {distill}")
        self.distill = distill
        if queue_size < 1 or not 0.0 <= momentum < 1.0:
            raise ConfigError(
                "queue_size", f"needs queue_size >= 1 and 0 <= momentum < 1, got {queue_size}, {momentum}"
            )
        self.queue_size = queue_size
        self.momentum = momentum
        self.scale = LogitScale(temperature, learn_temperature, max_logit_scale)
        self.gather = gather
        self.teacher: nn.Module | None = None
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}

    def bind(self, model: nn.Module) -> None:
        """Resolve the modalities, copy the model into the teacher and create the queues."""
        super().bind(model)
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        width = int(getattr(model.heads[self.modalities[0]], "out_dim", 0))  # type: ignore[index]
        if width < 1:
            raise ConfigError("modalities", "moco needs projection heads with an out_dim")
        g = torch.Generator().manual_seed(0)
        for m in self.modalities:
            self.register_buffer(f"queue_{m}", F.normalize(torch.randn(self.queue_size, width, generator=g), dim=1))
            self.register_buffer(f"queue_ids_{m}", torch.full((self.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """The teacher's embeddings of the batch's modalities (no gradient)."""
        if self.teacher is None:
            raise ValueError("moco: not bound to a model")
        with torch.no_grad():
            keys: dict[str, Tensor] = self.teacher(batch).embeddings
        return {f"key_{m}": v for m, v in keys.items() if m in self.modalities}

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Mean of both directions; metrics ``temperature``, ``paired``."""
        scale = self.scale()
        pair = self.pair(outputs, batch)
        names = {m: self.key(f"key_{m}") for m in self.modalities}
        keys = paired_rows(
            {m: outputs.extras[k] for m, k in names.items() if k in outputs.extras}, batch, self.modalities
        )
        n = pair.size if pair is not None else 0
        metrics = {"temperature": float(1.0 / scale.detach().exp()), "paired": float(n)}
        self._pending = {}
        if pair is None or keys is None or self.too_few(pair, self.gather):
            return LossOutput(loss=outputs.zero(scale), metrics=metrics)
        a, b = self.modalities
        self._pending = {a: (keys.a, keys.ids_a), b: (keys.b, keys.ids_b)}
        qa, qb = self._queue(a), self._queue(b)
        alpha = self.distill
        loss_ab = queue_infonce_loss(pair.a, keys.b, qb[0], scale, keys.ids_b, qb[1], self.gather, keys.a, alpha)
        loss_ba = queue_infonce_loss(pair.b, keys.a, qa[0], scale, keys.ids_a, qa[1], self.gather, keys.b, alpha)
        return LossOutput(loss=(loss_ab + loss_ba) / 2, metrics=metrics)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """EMA-update the teacher, then enqueue this step's keys."""
        if self.teacher is None:
            raise ValueError("moco: not bound to a model")
        ema_update(self.teacher, model, self.momentum)
        if not self._pending:
            return
        rows = []
        for m, (keys, ids) in self._pending.items():
            if self.gather and is_initialized():
                keys, ids = all_gather_no_grad(keys), all_gather_no_grad(ids)
            rows.append(keys.shape[0])
            self._enqueue(m, keys.detach(), ids)
        self.queue_ptr.copy_((self.queue_ptr + rows[0]) % self.queue_size)
        self._pending = {}

    def _queue(self, m: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"queue_{m}"), getattr(self, f"queue_ids_{m}")

    def _enqueue(self, m: str, keys: Tensor, ids: Tensor) -> None:
        queue, queue_ids = self._queue(m)
        keys, ids = keys[-self.queue_size :], ids[-self.queue_size :]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.queue_size
        queue[index] = keys.to(queue.dtype)
        queue_ids[index] = ids
