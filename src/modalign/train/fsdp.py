"""Fully sharded data parallelism (``train.fsdp``): PyTorch's FSDP2 ``fully_shard`` under torchrun.

Each rank holds ``1 / W`` of every parameter, its gradient and its optimiser state instead of a
full replica (DDP); a module's parameters are all-gathered just before its forward and backward
and freed after (Zhao et al. 2023, "PyTorch FSDP"). modalign shards each encoder as its own
unit (the towers are what grows), then the whole training step (``TrainingStep``: heads,
fusion, the objectives' parameters) as the root unit, so one step's forward is one FSDP forward
and gradients are reduce-scattered (averaged over ranks) in its backward, as DDP averages them.

Checkpoints stay in the single format every other run writes (``model.safetensors`` plus
``trainer.pt``): ``full_model_state`` and ``full_optimizer_state`` gather full tensors on every
rank through ``torch.distributed.checkpoint.state_dict`` (collective), rank 0 writes them, and
``load_full_state`` shards them back at whatever world size the resumed run has; a plain run
resumes an FSDP checkpoint and vice versa. Gathering a full state costs one model's worth of
memory per rank at checkpoint time, which is what makes a checkpoint readable without
torch.distributed (``modalign eval``, ``embed``).

Not supported (refused with a ``ConfigError`` at ``train.fsdp``): objectives with hooks that
read or write the model outside the training step (``on_epoch_start`` passes, ``after_step``
EMA teachers), gradient caching, and frozen pretrained backbones saved by reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from modalign.core.errors import ConfigError, TrainingError
from modalign.core.modules import Objective
from modalign.core.types import Batch
from modalign.methods.base import Method
from modalign.train.checkpoint import frozen_references
from modalign.train.distributed import mean_over_ranks

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def hooked_objectives(method: Method, hook: str) -> list[tuple[str, str]]:
    """``(label, class name)`` of the objectives of ``method`` that override ``Objective.<hook>``."""
    return [
        (label, type(objective).__name__)
        for label, objective in method.objectives.items()
        if isinstance(objective, Objective) and getattr(type(objective), hook) is not getattr(Objective, hook)
    ]


def check_shardable(method: Method) -> None:
    """Refuse what FSDP cannot run here.

    Raises:
        ConfigError: At ``train.fsdp``, naming the objective hook or the frozen backbone.
    """
    for hook in ("on_epoch_start", "after_step"):
        for label, kind in hooked_objectives(method, hook):
            raise ConfigError(
                "train.fsdp",
                f"objective {label!r} ({kind}) has an {hook} hook that runs the model "
                "outside the sharded training step; train it with DDP (fsdp: false)",
            )
    if frozen_references(method):
        raise ConfigError("train.fsdp", "frozen pretrained backbones are saved by reference; use DDP (fsdp: false)")


def wrap_fsdp(step: nn.Module, method: Method, world: int, device: torch.device) -> nn.Module:
    """Shard every encoder of ``method``, then ``step`` (the ``TrainingStep`` around it), over ``world`` ranks.

    Scalar parameters (temperatures, biases), which ``fully_shard`` refuses, stay replicated and
    have their gradients averaged over ranks by a post-accumulation hook, as DDP would.
    """
    mesh = init_device_mesh(device.type, (world,))
    scalars = {p for p in step.parameters() if p.dim() == 0}  # fully_shard takes no 0-d parameter
    for encoder in method.model.encoders.values():
        fully_shard(encoder, mesh=mesh, ignored_params=scalars)
    fully_shard(step, mesh=mesh, ignored_params=scalars)
    for p in scalars:  # replicated like DDP: gradients averaged over ranks as they are accumulated
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_gradient)
    return step


def _average_gradient(p: Tensor) -> None:
    assert p.grad is not None
    p.grad.copy_(mean_over_ranks(p.grad))


def _names(method: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimiser's order (the index keys of ``optimizer.state_dict()``)."""
    by_id = {id(p): n for n, p in method.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_state(method: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``method`` as a full CPU tensor on rank 0 (``{}`` elsewhere).

    Collective: every rank calls it.
    """
    state: Any = get_model_state_dict(method, options=_FULL)
    return dict(state)


def full_optimizer_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state with full tensors, keyed by index like an unsharded ``optimizer.state_dict()``.

    Collective: every rank calls it; rank 0 gets the state, the others ``{}``.
    """
    named: Any = get_optimizer_state_dict(method, optimizer, options=_FULL)
    if not named:
        return {}
    names = _names(method, optimizer)
    index = {n: i for i, n in enumerate(names)}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
        for g in named["param_groups"]
    ]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def load_full_state(
    method: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor], optim: dict[str, Any]
) -> None:
    """Shard full ``weights`` and an index-keyed optimiser state (as saved) into a sharded run."""
    full: Any = weights
    set_model_state_dict(method, full, options=StateDictOptions(full_state_dict=True))
    names = _names(method, optimizer)
    named: Any = {
        "state": {names[int(i)]: s for i, s in optim["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim["param_groups"]],
    }
    set_optimizer_state_dict(method, optimizer, named, options=StateDictOptions(full_state_dict=True))


def modalities_split_across_ranks(batch: Batch, modalities: tuple[str, ...]) -> list[str]:
    """The modalities some ranks' batches observe and others' lack in every row (collective).

    Each encoder is its own FSDP unit whose weights are all-gathered when it runs; a rank whose
    rows all lack a modality skips that encoder, and the other ranks would wait for it forever.
    One all-reduce of ``2 M`` flags per step lets the trainer fail with a message instead.
    """
    seen = torch.tensor([float(m in batch.data and bool(batch.rows(m).any())) for m in modalities])
    both = torch.cat([seen, -seen]).to(batch.ids.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # [max over ranks, -min over ranks]
    highs, lows = both[: len(modalities)].tolist(), (-both[len(modalities) :]).tolist()
    return [m for m, hi, lo in zip(modalities, highs, lows, strict=True) if hi != lo]


def split_modalities_error(split: list[str], where: str) -> TrainingError:
    """The error for :func:`modalities_split_across_ranks` finding ``split`` at ``where``."""
    return TrainingError(
        f"train.fsdp: at {where}, modalities {split} are observed in some ranks' batches and absent from every "
        "row of others'; FSDP runs each encoder on every rank, so partially paired data needs DDP "
        "(fsdp: false) or larger batches"
    )
