"""The training loop: the same for every method.

Per step it calls ``method(batch) -> Outputs`` (the features), ``method.loss(outputs, batch)``
(the maths), then the optimiser, then ``method.after_step(ctx)``; per epoch
``method.on_epoch_start(ctx)`` before the first batch. It knows nothing else of methods.

AdamW with decoupled weight decay (not on biases, norms or the temperature), linear warm-up
then cosine decay, gradient clipping, optional bf16 autocast, seeded per-epoch randomness,
progress on stderr (``progress.py``), ``metrics.jsonl`` (also sent to the tracker of
``tracking.py``) and atomic checkpoints at epoch ends.

Failures a user can act on become ``TrainingError``/``CheckpointError`` messages
(``failures.py``): a non-finite loss (after ``train.skip_nonfinite`` skipped batches, counted
as ``skipped_nonfinite`` in ``metrics.jsonl`` and in the checkpoint), out of memory on a batch,
an unreadable checkpoint on resume.

Determinism and resume: every epoch re-seeds Python/NumPy/torch and the shuffling generator
from ``(seed, epoch)`` and re-pairs the dataset with ``set_epoch``; a checkpoint holds the
weights, optimiser and scheduler after a whole epoch. Resuming therefore replays exactly the
epochs an uninterrupted run would have run (same losses, same final weights on one device).

Data parallelism (``distributed.py``): under an initialised process group ``train.batch_size``
is the global batch, each rank trains on its slice of every global batch through DDP, the
objectives gather (``gather=True``), logged values are averaged over ranks and only rank 0
writes checkpoints and ``metrics.jsonl``. Every rank re-seeds from ``(seed, epoch)`` for the
epoch-start hooks, then from ``rank_seed`` for augmentation and per-step randomness.

Host synchronisation: the step loop keeps the loss on the device and reads it (``.item()``)
only at ``log_every`` steps and epoch ends. With ``train.skip_nonfinite: 0`` a non-finite loss
is recorded on the device (first step, value, batch ids) and raised at the next log step or
epoch end, before any checkpoint; the steps in between ran on non-finite gradients but nothing
of them is saved. With ``train.skip_nonfinite > 0`` the loss must be checked before the
optimiser steps, so that costs one synchronisation per step (and, under DDP, one all-reduce of
the flag so that every rank skips the same batch).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from modalign.core.errors import CheckpointError, ConfigError, TrainingError
from modalign.core.types import Batch, EpochContext, LossOutput, StepContext
from modalign.data.base import MultimodalDataset
from modalign.data.pairing import MixedBatches, PairingView
from modalign.data.perturb import drop_modalities
from modalign.data.shards import CHUNK, ShardStream, StreamEpoch, stream_batches, stream_samples
from modalign.distributed import rank, world_size
from modalign.methods.base import Method
from modalign.train.build import make_loader
from modalign.train.checkpoint import (
    latest_checkpoint,
    load_state,
    load_weights,
    previous_checkpoint,
    read_weights,
    save_checkpoint,
)
from modalign.train.distributed import (
    ContiguousShard,
    ShardedBatches,
    TrainingStep,
    any_rank,
    average_records,
    enable_gather,
    gather_rng_states,
    global_batch_norm,
    mean_over_ranks,
    per_rank_batch,
    rank_seed,
    wrap_ddp,
)
from modalign.train.failures import StepPlace, is_out_of_memory, nonfinite_error, out_of_memory_error
from modalign.train.fsdp import (
    check_shardable,
    full_model_state,
    full_optimizer_state,
    hooked_objectives,
    load_full_state,
    modalities_split_across_ranks,
    split_modalities_error,
    wrap_fsdp,
)
from modalign.train.grad_cache import all_reduce_gradients, check_cacheable, grad_cache_backward
from modalign.train.optim import make_optimizer, warmup_cosine
from modalign.train.progress import Progress, make_progress
from modalign.train.recipe import TrainConfig
from modalign.train.records import METRICS_FILE, MetricsLog, NonfiniteWatch
from modalign.train.tracking import Tracker

logger = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` (0-based) of a run seeded with ``seed``."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**31)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Progress of a run: epochs completed, optimiser steps taken, batches skipped for a non-finite loss."""

    epoch: int = 0
    step: int = 0
    skipped_nonfinite: int = 0


@dataclass
class MidEpoch:
    """Where a mid-epoch checkpoint stopped inside epoch ``TrainState.epoch`` (streamed training).

    Attributes:
        batches: Batches of the epoch already trained on (each rank's stream consumed
            ``batches x`` its local batch).
        loss_sum: Sum of those batches' losses (averaged over ranks), for the epoch's mean.
        world: Ranks that wrote it. workers: ``train.num_workers`` it was written with.
            chunk: Samples per worker hand-over (``data.shards.CHUNK`` then). The stream's
            order depends on all three, so a resume must use the same.
    """

    batches: int
    loss_sum: float
    world: int
    workers: int
    chunk: int = CHUNK


class Trainer:
    """Optimises a ``Method`` on a dataset; checkpoints into ``run_dir/checkpoints``.

    Args:
        method: The method (model + objectives).
        dataset: Training split.
        cfg: ``TrainConfig``.
        run_dir: Run directory.
        device: Device to train on.
        tracker: Receives the ``metrics.jsonl`` records (default: none).

    Under an initialised process group (``torchrun``) it trains data-parallel: see the module
    docstring and ``distributed.py``; ``train.batch_size`` is then the global batch.

    Raises:
        ConfigError: ``train.batch_size`` exceeds the training split, or is not a multiple of
            the world size.
    """

    def __init__(
        self,
        method: Method,
        dataset: MultimodalDataset | ShardStream,
        cfg: TrainConfig,
        run_dir: Path,
        device: torch.device,
        tracker: Tracker | None = None,
    ) -> None:
        self.method = method.to(device)
        self.dataset = dataset
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.tracker = tracker or Tracker()
        self.rank, self.world = rank(), world_size()
        self.local_batch = per_rank_batch(cfg.batch_size, self.world)
        if self.world > 1:
            enable_gather(self.method)
            global_batch_norm(self.method)
        self.step_module: torch.nn.Module | None = None
        if cfg.grad_cache is not None:
            check_cacheable(self.method)
        self.fsdp = cfg.fsdp and self.world > 1
        if self.fsdp:
            if cfg.grad_cache is not None:
                raise ConfigError("train.fsdp", "gradient caching runs the method outside the sharded step; pick one")
            check_shardable(self.method)
            self.step_module = wrap_fsdp(TrainingStep(self.method), self.method, self.world, device)
        self.stream = dataset if isinstance(dataset, ShardStream) else None
        self._check_stream()
        self.mixed = mixed_pairing(dataset)
        if self.mixed is not None and self.world > 1:
            raise ConfigError(
                "data.paired_per_batch", "mixed paired/unimodal batches run in one process so far; null under torchrun"
            )
        if self.mixed is not None:
            self.steps_per_epoch = len(self._mixed_batches(0))
        elif self.stream is None:
            self.steps_per_epoch = len(dataset) // cfg.batch_size
        else:  # every rank takes the steps its smallest possible share of the shards allows
            self.steps_per_epoch = self.stream.rank_samples(self.world) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                "train.batch_size", f"{cfg.batch_size} exceeds the {len(dataset)} training samples; lower it"
            )
        self.mid: MidEpoch | None = None
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = make_optimizer(method, cfg)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio))
        self.state = TrainState()
        self.progress: Progress = Progress(cfg.epochs, self.total_steps)

    def _check_stream(self) -> None:
        """Refuse mid-epoch checkpoints without a stream, and epoch-start passes over a stream.

        Raises:
            ConfigError: At ``train.save_every_steps`` or ``train.shards``, naming the reason.
        """
        if self.cfg.save_every_steps is not None and self.stream is None:
            raise ConfigError(
                "train.save_every_steps",
                "mid-epoch checkpoints need the training split as a stream of shards (train.shards): the "
                "augmentation of a map-style split is not seeded per sample, so a resumed epoch could not repeat it",
            )
        hooked = hooked_objectives(self.method, "on_epoch_start")
        if self.stream is not None and hooked:
            label, kind = hooked[0]
            raise ConfigError(
                "train.shards",
                f"objective {label!r} ({kind}) passes over the whole training split at each epoch start, which a "
                "stream of shards does not offer; train it from the `data` dataset",
            )

    @property
    def ckpt_dir(self) -> Path:
        """``run_dir/checkpoints``."""
        return self.run_dir / "checkpoints"

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; returns whether it did.

        Raises:
            CheckpointError: The checkpoint cannot be read or does not fit; the message names the
                file, ``--no-resume`` and the previous complete checkpoint if there is one.
        """
        folder = latest_checkpoint(self.ckpt_dir)
        if folder is None:
            return False
        try:
            self._load(folder)
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            raise resume_error(folder, e) from e
        return True

    def _load(self, folder: Path) -> None:
        state = load_state(folder)
        if self.fsdp:
            load_full_state(self.method, self.optimizer, read_weights(folder), state["optimizer"])
        else:
            load_weights(folder, self.method)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(state["epoch"], state["step"], state.get("skipped_nonfinite", 0))
        rng = state["rng"]
        if "mid_epoch" in state:
            self.mid = MidEpoch(**state["mid_epoch"])
            if (self.mid.world, self.mid.workers) != (self.world, self.cfg.num_workers):
                raise CheckpointError(
                    f"checkpoint {folder} was written inside an epoch by {self.mid.world} rank(s) with "
                    f"train.num_workers={self.mid.workers}; the stream's order depends on both, so resume with the "
                    f"same (now {self.world} rank(s), {self.cfg.num_workers} workers)"
                )
            if self.mid.chunk != CHUNK:
                raise CheckpointError(
                    f"checkpoint {folder} was written inside an epoch by a modalign whose workers handed over "
                    f"{self.mid.chunk} samples at a time (now {CHUNK}); resume from an epoch-end checkpoint"
                )
            rng = state["rng_ranks"][self.rank]  # each rank continues its own random stream
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])

    def fit(self, resume: bool = True, max_epochs: int | None = None, progress: Progress | None = None) -> TrainState:
        """Train until ``cfg.epochs`` are done (or ``max_epochs`` more epochs in this call).

        Args:
            resume: Continue from the latest checkpoint if there is one.
            max_epochs: Stop after this many epochs in this call.
            progress: Progress reporter (default: a bar on a terminal, else lines on stderr).

        Raises:
            TrainingError: A non-finite loss (beyond ``train.skip_nonfinite``) or out of memory.
            CheckpointError: The checkpoint to resume from cannot be read.
        """
        resumed = self.resume() if resume else False
        if self.world > 1 and self.step_module is None and self.cfg.grad_cache is None:
            self.step_module = wrap_ddp(self.method, self.device)
        self.tracker.start(self.state.step if resumed else None)
        resume_step = self.state.step if resumed else None
        log = MetricsLog(self.run_dir / METRICS_FILE, resume_step, self.tracker, lead=self.rank == 0)
        quiet = Progress(self.cfg.epochs, self.total_steps)  # ranks other than 0 report nothing
        shown = make_progress(self.cfg.epochs, self.total_steps, self.cfg.progress_every) if self.rank == 0 else quiet
        self.progress = progress or shown
        end = self.cfg.epochs if max_epochs is None else min(self.cfg.epochs, self.state.epoch + max_epochs)
        while self.state.epoch < end:
            summary = self._run_epoch(self.state.epoch, log)
            self.state.epoch += 1
            log.write({"step": self.state.step, "epoch": self.state.epoch, **summary})
            if self.state.epoch % self.cfg.save_every == 0 or self.state.epoch == self.cfg.epochs:
                self._save()
        return self.state

    def _save(self, mid: MidEpoch | None = None) -> None:
        """Rank 0 writes a checkpoint; sharded runs first gather full tensors on every rank.

        ``mid``: a checkpoint inside an epoch (``train.save_every_steps``), tagged
        ``epoch-EEEE-step-SSSSSSSS`` (sorting between its epoch's ends); it also holds every
        rank's RNG states, gathered here.
        """
        weights = full_model_state(self.method) if self.fsdp else None
        optimizer = full_optimizer_state(self.method, self.optimizer) if self.fsdp else None
        rng_ranks = gather_rng_states() if mid is not None else None
        if self.rank != 0:
            return
        state: dict[str, Any] = {
            "optimizer": optimizer if optimizer is not None else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }
        tag = f"epoch-{self.state.epoch:04d}"
        if mid is not None:
            state |= {"mid_epoch": asdict(mid), "rng_ranks": rng_ranks}
            tag += f"-step-{self.state.step:08d}"
        save_checkpoint(self.ckpt_dir, tag, self.method, state, self.cfg.keep_checkpoints, weights)

    def _run_epoch(self, epoch: int, log: MetricsLog) -> dict[str, float]:
        seed = epoch_seed(self.cfg.seed, epoch)
        mid, self.mid = self.mid, None
        if mid is None:  # a resumed epoch has its RNG states from the checkpoint instead
            seed_everything(seed)
            if isinstance(self.dataset, MultimodalDataset):
                self.dataset.set_epoch(epoch)
            ctx = EpochContext(self.state.step, epoch, self.total_steps, self.steps_per_epoch, self._dataset_pass)
            self.method.on_epoch_start(ctx)
            if self.world > 1:
                seed_everything(rank_seed(seed, self.rank))
        self.method.train()
        total = torch.zeros((), device=self.device)
        done = 0
        if mid is not None:
            total, done = torch.tensor(mid.loss_sum, device=self.device), mid.batches
        count, start = 0, time.perf_counter()
        watch = NonfiniteWatch(self.device)
        self.progress.start_epoch(epoch, self.steps_per_epoch)
        for batch in self._loader(seed, done, epoch):
            batch = drop_modalities(batch, self.cfg.modality_dropout).to(self.device)
            out = self._step(batch, epoch)
            if out is None:
                continue
            loss = out.loss.detach()
            if self.cfg.skip_nonfinite == 0:
                watch.observe(loss, self.state.step + 1, batch.ids)
            total += loss
            count += self.cfg.batch_size
            done += 1
            self.state.step += 1
            self.method.after_step(self._context(epoch))
            self.progress.step(self.state.step, loss, self.cfg.batch_size)
            if self.state.step % self.cfg.log_every == 0:
                self._check_nonfinite(watch, epoch)
                rate = count / max(time.perf_counter() - start, 1e-9)
                log.write(self._step_record(epoch + done * self.cfg.batch_size / len(self.dataset), rate, out))
            every = self.cfg.save_every_steps
            if every is not None and self.state.step % every == 0 and done < self.steps_per_epoch:
                self._check_nonfinite(watch, epoch)  # nothing non-finite is ever saved
                loss_sum = float(mean_over_ranks(total).item())
                self._save(MidEpoch(done, loss_sum, self.world, self.cfg.num_workers))
        self._check_nonfinite(watch, epoch)
        steps = max(1, done)
        mean = float(mean_over_ranks(total).item()) / steps
        self.progress.end_epoch(epoch, mean)
        return {
            "epoch_loss": mean,
            "epoch_seconds": time.perf_counter() - start,
            "skipped_nonfinite": self.state.skipped_nonfinite,
        }

    def _mixed_batches(self, epoch: int) -> MixedBatches:
        assert self.mixed is not None
        mixed = self.mixed
        return MixedBatches(
            mixed, self.cfg.batch_size, mixed.paired_per_batch, self.cfg.seed, epoch, mixed.unimodal_views
        )

    def _loader(self, seed: int, done: int = 0, epoch: int = 0) -> Any:
        """The epoch's shuffled batches: the whole batch in one process, this rank's slice of it under DDP.

        A stream of shards gives each rank its own batches, from the position after ``done``
        batches of the epoch; ``data.paired_per_batch`` gives batches of that many pairs and
        the rest unimodal samples (``MixedBatches``).
        """
        if self.mixed is not None:
            assert isinstance(self.dataset, MultimodalDataset)
            return make_loader(
                self.dataset,
                self.cfg.batch_size,
                False,
                num_workers=self.cfg.num_workers,
                seed=seed,
                batch_sampler=self._mixed_batches(epoch),
            )
        if isinstance(self.dataset, ShardStream):
            order = StreamEpoch(seed, self.rank, self.world, consumed=done * self.local_batch)
            samples = stream_samples(self.dataset.with_epoch(order), self.cfg.num_workers)
            return stream_batches(samples, self.local_batch, self.steps_per_epoch - done, self.dataset.modalities)
        if self.world == 1:
            return make_loader(
                self.dataset, self.cfg.batch_size, True, num_workers=self.cfg.num_workers, seed=seed, drop_last=True
            )
        sampler = ShardedBatches(len(self.dataset), self.cfg.batch_size, self.rank, self.world, seed)
        return make_loader(
            self.dataset,
            self.local_batch,
            False,
            num_workers=self.cfg.num_workers,
            seed=rank_seed(seed, self.rank),
            drop_last=True,
            sampler=sampler,
        )

    def _check_nonfinite(self, watch: NonfiniteWatch, epoch: int) -> None:
        """Raise for the first non-finite loss ``watch`` saw (on any rank); reads the device.

        Raises:
            TrainingError: A loss was non-finite and ``train.skip_nonfinite`` is 0.
        """
        found = watch.first()
        if not any_rank(found is not None, self.device):
            return
        if found is None:
            raise TrainingError(
                f"non-finite loss on another rank in epoch {epoch + 1}/{self.cfg.epochs} (see its error line)"
            )
        step, value, ids = found
        place = StepPlace(step, self.total_steps, epoch + 1, self.cfg.epochs, ids)
        last = latest_checkpoint(self.ckpt_dir)
        raise nonfinite_error(place, value, self.cfg.lr, self.cfg.skip_nonfinite, last)

    def _step_record(self, epoch: float, rate: float, out: LossOutput) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of the step just taken (values averaged over ranks)."""
        values = torch.stack([out.loss.detach().float(), *(v.detach().float() for v in out.parts.values())])
        reduced: list[float] = mean_over_ranks(values).tolist()
        record = {
            "step": self.state.step,
            "epoch": epoch,
            "loss": reduced[0],
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": rate,
            "skipped_nonfinite": self.state.skipped_nonfinite,
            **{f"loss/{k}": v for k, v in zip(out.parts, reduced[1:], strict=True)},
        }
        return record | average_records(dict(out.metrics))

    def _context(self, epoch: int) -> StepContext:
        return StepContext(self.state.step, epoch, self.total_steps, self.steps_per_epoch)

    def _dataset_pass(self) -> Any:
        """One unshuffled pass over the training split, on the device (for epoch-start hooks).

        Under DDP each rank passes over its contiguous shard (``ContiguousShard``); objectives
        gather the rows, in rank order, into the single-process pass.
        """
        assert isinstance(self.dataset, MultimodalDataset)  # a stream refuses epoch-start hooks (_check_stream)
        sampler = ContiguousShard(len(self.dataset), self.rank, self.world) if self.world > 1 else None
        loader = make_loader(
            self.dataset, self.local_batch, shuffle=False, num_workers=self.cfg.num_workers, sampler=sampler
        )
        return (batch.to(self.device) for batch in loader)

    def _step(self, batch: Batch, epoch: int) -> LossOutput | None:
        """One optimiser step on ``batch``; ``None`` if the batch was skipped for a non-finite loss.

        Raises:
            TrainingError: Out of memory, or a non-finite loss beyond ``train.skip_nonfinite``.
        """
        if self.fsdp and (split := modalities_split_across_ranks(batch, self.method.modalities)):
            raise split_modalities_error(split, self._place(batch, epoch).describe())
        try:
            if self.cfg.grad_cache is not None:
                self.optimizer.zero_grad(set_to_none=True)
                out = grad_cache_backward(self.method, batch, self.cfg.grad_cache, self._autocast)
                all_reduce_gradients(self.method)
            else:
                out = self._forward(batch)
            if self.cfg.skip_nonfinite > 0 and any_rank(not bool(torch.isfinite(out.loss.detach())), self.device):
                self._skip_nonfinite(out, batch, epoch)
                return None
            if self.cfg.grad_cache is None:
                self._update(out)
            else:
                self._apply_gradients()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise out_of_memory_error(
                self._place(batch, epoch), self.cfg.batch_size, self.device, self.cfg.precision
            ) from None
        return out

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _forward(self, batch: Batch) -> LossOutput:
        with self._autocast():
            if self.step_module is not None:
                out: LossOutput = self.step_module(batch)
                return out
            return self.method.loss(self.method(batch), batch)

    def _update(self, out: LossOutput) -> None:
        """Back-propagate ``out.loss`` into fresh gradients, then ``_apply_gradients``."""
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self._apply_gradients()

    def _apply_gradients(self) -> None:
        """Clip the gradients already in ``.grad``, step the optimiser and the schedule."""
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def _skip_nonfinite(self, out: LossOutput, batch: Batch, epoch: int) -> None:
        """Skip the batch (no optimiser or scheduler step, no hooks) or fail once the allowance is used up."""
        place = self._place(batch, epoch)
        value = out.loss.detach().float().item()
        if self.state.skipped_nonfinite >= self.cfg.skip_nonfinite:
            last = latest_checkpoint(self.ckpt_dir)
            raise nonfinite_error(place, value, self.cfg.lr, self.cfg.skip_nonfinite, last)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_nonfinite += 1
        logger.warning(
            "skipped a batch with non-finite loss (%s) at %s: %d of %d allowed by train.skip_nonfinite",
            value,
            place.describe(),
            self.state.skipped_nonfinite,
            self.cfg.skip_nonfinite,
        )

    def _place(self, batch: Batch, epoch: int) -> StepPlace:
        ids = [int(i) for i in batch.ids.tolist()]
        return StepPlace(self.state.step + 1, self.total_steps, epoch + 1, self.cfg.epochs, ids)


def mixed_pairing(dataset: MultimodalDataset | ShardStream) -> PairingView | None:
    """The ``PairingView`` under ``dataset`` (through ``InputView``s) if it sets ``paired_per_batch``."""
    inner: Any = dataset
    while inner is not None and not isinstance(inner, PairingView):
        inner = getattr(inner, "dataset", None)
    return inner if isinstance(inner, PairingView) and inner.paired_per_batch is not None else None


def resume_error(folder: Path, err: Exception) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed from: what to do, and the previous good one."""
    reason = str(err) if isinstance(err, CheckpointError) else f"checkpoint {folder} is incomplete ({err!r})"
    previous = previous_checkpoint(folder)
    instead = f"delete {folder} to resume from the previous checkpoint {previous}" if previous else f"delete {folder}"
    return CheckpointError(f"{reason}; rerun with --no-resume to start over, or {instead}")
