"""Turn a validated ``Recipe`` into datasets, loaders and a ``Method``.

Constructors receive explicit arguments (STYLE rule 4): this module is the only place that
reads the recipe tree and spreads it into keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from modalign.core.config import check_component
from modalign.core.errors import ConfigError
from modalign.core.modules import Encoder, Fusion
from modalign.core.registry import create, lookup
from modalign.core.types import ModalitySpec
from modalign.data.base import MultimodalDataset
from modalign.data.collate import Collator
from modalign.data.pairing import PairingView
from modalign.data.raw import InputView, ModalityInput
from modalign.data.shards import ShardIndex, ShardStream, read_index, write_shards
from modalign.encoders.feature_cache import cached_input, encoder_input
from modalign.encoders.pretrained import PretrainedEncoder
from modalign.methods.base import Method, MultimodalModel
from modalign.train.recipe import (
    DATASET_PROVIDED,
    ENCODER_PROVIDED,
    FUSION_PROVIDED,
    HEAD_PROVIDED,
    Recipe,
    data_pairing,
    expand_method,
)


def build_dataset(
    recipe: Recipe,
    split: str,
    data_root: str | None = None,
    artifacts: dict[str, str] | None = None,
    augment: bool | None = None,
    pairing: bool = True,
) -> MultimodalDataset:
    """Create the recipe's dataset for ``split``; ``data_root`` overrides ``data.root``.

    The pairing keys (``data.paired_fraction``, ``data.pair_noise``, ``data.paired_per_batch``)
    never reach the dataset's constructor: when one is set, the train split is wrapped in a
    ``PairingView`` (seeded by ``train.seed``), inside any ``InputView``; other splits are not,
    nor the train split with ``pairing=False`` (evaluation: probes fit on true pairs and labels).
    """
    mapping, keys = data_pairing(recipe.data)
    name, kwargs = check_component("dataset", mapping, "data", DATASET_PROVIDED)
    if data_root is not None:
        kwargs["root"] = data_root
    dataset: MultimodalDataset = create(
        "dataset", name, split=split, seed=recipe.train.seed, augment=augment, artifacts=artifacts, **kwargs
    )
    if split == "train" and keys.active and pairing:
        dataset = PairingView(
            dataset,
            keys.paired_fraction,
            keys.pair_noise,
            seed=recipe.train.seed,
            paired_per_batch=keys.paired_per_batch,
            unimodal_views=keys.unimodal_views,
        )
    return with_encoder_inputs(recipe, dataset)


def build_train_split(
    recipe: Recipe, artifacts: dict[str, str] | None = None, augment: bool | None = None, pairing: bool = True
) -> MultimodalDataset | ShardStream:
    """The training split: a stream of the shards of ``train.shards`` if set, else ``build_dataset(..., "train")``.

    A stream iterates one unshuffled pass until the trainer sets an epoch's order.
    """
    if recipe.train.shards is not None:
        return ShardStream(read_index(recipe.train.shards), recipe.train.shuffle_buffer)
    return build_dataset(recipe, "train", artifacts=artifacts, augment=augment, pairing=pairing)


def write_recipe_shards(recipe: Recipe, out: Path, split: str = "train", shard_size: int = 1000) -> ShardIndex:
    """Write ``split`` of the recipe's dataset (without augmentation) as WebDataset shards under ``out``.

    The index records the train split's fitted artifacts (tokenizers), which a run trained on the
    shards keeps to read its test split the same way.
    """
    train = build_dataset(recipe, "train", augment=False)
    dataset = train if split == "train" else build_dataset(recipe, split, artifacts=train.artifacts(), augment=False)
    source = {"data": dict(recipe.data), "seed": recipe.train.seed}
    return write_shards(dataset, out, shard_size, split, artifacts=train.artifacts(), source=source)


def with_encoder_inputs(recipe: Recipe, dataset: MultimodalDataset) -> MultimodalDataset:
    """``dataset`` with the inputs of the recipe's pretrained encoders made from its raw values.

    Pretrained encoders (``PretrainedEncoder``) bring their own preprocessing: the values of
    their modalities become the encoder's preprocessing of the raw value (``cache: false``) or
    the cached features (``cache: true``, built on first use). Other modalities are unchanged.
    """
    inputs: dict[str, ModalityInput] = {}
    for modality, entry in sorted(recipe.model.encoders.items()):
        name, kwargs = check_component("encoder", entry, f"model.encoders.{modality}", ENCODER_PROVIDED)
        cls = lookup("encoder", name)
        if not issubclass(cls, PretrainedEncoder) or modality not in dataset.modalities:
            continue
        live = cls(**{**kwargs, "cache": False, "frozen": True})
        source = cached_input if kwargs.get("cache") else encoder_input
        inputs[modality] = source(dataset, modality, live)
    return InputView(dataset, inputs) if inputs else dataset


def build_encoder(modality: str, spec: ModalitySpec, entry: dict[str, Any]) -> Encoder:
    """Create one encoder from its recipe mapping and the data's ``ModalitySpec``.

    Raises:
        ConfigError: If the encoder reads another modality kind than the data provides.
    """
    path = f"model.encoders.{modality}"
    name, kwargs = check_component("encoder", entry, path, ENCODER_PROVIDED)
    cls = lookup("encoder", name)
    if cls.kind != spec.kind:
        raise ConfigError(
            f"{path}.name",
            f"encoder {name!r} reads {cls.kind!r} but modality {modality!r} is {spec.kind!r}",
            [n for n in _encoders_of_kind(spec.kind)],
        )
    encoder: Encoder = cls(**cls.spec_kwargs(spec), **kwargs)
    return encoder


def _encoders_of_kind(kind: str) -> list[str]:
    from modalign.core.registry import available

    return [n for n in available("encoder") if lookup("encoder", n).kind == kind]


def build_model(recipe: Recipe, specs: dict[str, ModalitySpec]) -> MultimodalModel:
    """Create the encoders, heads and fusion of the recipe's ``model`` section.

    Raises:
        ConfigError: If the recipe names a modality the dataset does not have.
    """
    encoders: dict[str, Encoder] = {}
    for modality in sorted(recipe.model.encoders):
        if modality not in specs:
            raise ConfigError(f"model.encoders.{modality}", "the dataset has no such modality", sorted(specs))
        encoders[modality] = build_encoder(modality, specs[modality], recipe.model.encoders[modality])
        if modality in recipe.model.frozen:
            encoders[modality].freeze()
    heads = {m: build_head(recipe, m, enc.dim) for m, enc in encoders.items()}
    fusion_name, fusion_kwargs = check_component("fusion", recipe.model.fusion, "model.fusion", FUSION_PROVIDED)
    fusion: Fusion = create("fusion", fusion_name, widths={m: enc.dim for m, enc in encoders.items()}, **fusion_kwargs)
    fusion_head = build_head(recipe, "fused", fusion.dim) if fusion.dim > 0 else None
    return MultimodalModel(encoders, heads, fusion, fusion_head)


def build_head(recipe: Recipe, key: str, in_dim: int) -> nn.Module:
    """The projection head of ``key`` (a modality, or ``fused``): ``model.heads[key]`` else ``model.head``."""
    entry, path = (
        (recipe.model.heads[key], f"model.heads.{key}")
        if key in recipe.model.heads
        else (
            recipe.model.head,
            "model.head",
        )
    )
    name, kwargs = check_component("head", entry, path, HEAD_PROVIDED)
    head: nn.Module = create("head", name, in_dim=in_dim, out_dim=recipe.model.embed_dim, **kwargs)
    return head


def build_method(recipe: Recipe, specs: dict[str, ModalitySpec]) -> Method:
    """Create the model, then the method's objectives, bound to it.

    Raises:
        ConfigError: If the recipe names a modality the dataset does not have, or an objective
            does not fit the model (with the objective's key path).
    """
    model = build_model(recipe, specs)
    entries = expand_method(recipe.method)
    objectives = []
    for spec in entries:
        try:
            objectives.append((spec.label, create("objective", spec.name, **spec.kwargs), spec.weight))
        except ConfigError as e:
            raise e.under(spec.path) from None
    try:
        return Method(model, objectives)
    except ConfigError as e:
        index, _, rest = e.path.removeprefix("objectives.").partition(".")
        raise ConfigError(rest, e.message, e.allowed, e.suggestions).under(entries[int(index)].path) from None


def make_loader(
    dataset: MultimodalDataset | ShardStream,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler[int] | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
) -> DataLoader[Any]:
    """A ``DataLoader`` collating into ``Batch``; shuffling (and workers' seeds) are seeded by ``seed``.

    ``sampler`` (e.g. a rank's share under data parallelism) replaces the sequential or shuffled
    order; ``shuffle`` must then be ``False``. ``batch_sampler`` yields whole batches of indices
    (``batch_size``, ``shuffle``, ``drop_last`` and ``sampler`` are then unused).
    """
    generator = torch.Generator().manual_seed(seed)
    if batch_sampler is not None:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=Collator(dataset.modalities),
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collator(dataset.modalities),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
