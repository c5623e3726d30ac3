"""Pairing of the training split (``modalign.data.pairing``): kept pairs, unimodal samples, noise, batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modalign.core import ModalitySpec, Sample
from modalign.core.errors import ConfigError
from modalign.data.base import MultimodalDataset
from modalign.data.collate import Collator, collate
from modalign.data.pairing import MixedBatches, PairingView, fraction_count
from modalign.data.raw import InputView, ModalityInput
from modalign.train import build
from modalign.train.recipe import describe_keys, load_recipe, validate_recipe

NAMES = ("a", "b", "c")
DIMS = {"a": 3, "b": 2, "c": 4}
FIRST_ID = 1000


class Toy(MultimodalDataset):
    """``n`` samples whose values say where they come from: ``value[m] = [index, code of m, ...]``.

    Sample ids are ``1000 + index``; modality ``b``'s content id is ``index // 2`` (shared by two
    samples, like an av-digits recording); every 7th sample lacks ``c`` (partially paired).
    """

    def __init__(self, n: int = 40, names: tuple[str, ...] = ("a", "b"), gaps: bool = False) -> None:
        self.n, self.names, self.gaps = n, names, gaps
        self.epochs: list[int] = []
        self.skipped: list[frozenset[str]] = []

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {m: ModalitySpec("vector", channels=DIMS[m]) for m in self.names}

    @property
    def label_names(self) -> tuple[str, ...]:
        return ("cls",)

    def __len__(self) -> int:
        return self.n

    def has(self, index: int, m: str) -> bool:
        return not (self.gaps and m == "c" and index % 7 == 0)

    def value(self, index: int, m: str) -> torch.Tensor:
        return torch.tensor([float(index), float(NAMES.index(m))] + [0.5] * (DIMS[m] - 2))

    def __getitem__(self, index: int) -> Sample:
        return self.item(index)

    def item(self, index: int, skip: frozenset[str] = frozenset()) -> Sample:
        if not 0 <= index < self.n:
            raise IndexError(index)
        self.skipped.append(skip)
        values = {m: None if m in skip else self.value(index, m) for m in self.names if self.has(index, m)}
        ids = {"b": index // 2} if "b" in self.names else {}
        return Sample(FIRST_ID + index, values, {"cls": index % 3}, ids)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def artifacts(self) -> dict[str, str]:
        return {"toy.json": "{}"}


def origin_of(value: torch.Tensor) -> tuple[int, str]:
    """``(source index, modality)`` written in a Toy value."""
    return int(value[0]), NAMES[int(value[1])]


def derived(view: PairingView) -> list[Sample]:
    return [view[i] for i in range(len(view))]


# ----------------------------------------------------------------------------- paired fraction


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.73, 1.0])
def test_paired_fraction_is_exact(fraction: float) -> None:
    toy = Toy(40)
    view = PairingView(toy, paired_fraction=fraction, seed=3)
    kept = int(np.floor(fraction * 40 + 0.5))
    assert len(view.paired_indices) == kept == fraction_count(fraction, 40)
    assert len(view) == kept + 2 * (40 - kept)
    samples = derived(view)
    for i in view.paired_indices.tolist():
        assert set(samples[i].values) == {"a", "b"}
    for i in view.unimodal_indices.tolist():
        assert len(samples[i].values) == 1


def test_fraction_counts_round_halves_up() -> None:
    assert [fraction_count(0.5, n) for n in (4, 5, 7)] == [2, 3, 4]
    assert fraction_count(1.0, 9) == 9 and fraction_count(0.0, 9) == 0


def test_every_value_appears_exactly_once_with_gaps_and_noise() -> None:
    toy = Toy(50, NAMES, gaps=True)
    view = PairingView(toy, paired_fraction=0.4, pair_noise=0.5, seed=1)
    seen = Counter(origin_of(v) for s in derived(view) for v in s.values.values())
    expected = {(i, m) for i in range(50) for m in NAMES if toy.has(i, m)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}
    # one unimodal sample per modality a split sample has
    split = set(range(50)) - {view.origin(i).source for i in view.paired_indices.tolist()}
    assert len(view.unimodal_indices) == sum(toy.has(i, m) for i in split for m in NAMES)


def test_kept_samples_are_the_datasets_and_nested_in_the_fraction() -> None:
    toy = Toy(40)
    small, large = (PairingView(toy, paired_fraction=p, seed=5) for p in (0.3, 0.6))
    kept = [{v.origin(i).source for i in v.paired_indices.tolist()} for v in (small, large)]
    assert kept[0] < kept[1]
    for i in small.paired_indices.tolist():
        s, source = small[i], small.origin(i).source
        assert s.id == FIRST_ID + source and s.labels == {"cls": source % 3}
        assert s.modality_ids == {"b": source // 2}
        assert {m: origin_of(v) for m, v in s.values.items()} == {"a": (source, "a"), "b": (source, "b")}


# ----------------------------------------------------------------------------- ids of unimodal samples


def test_unimodal_samples_get_fresh_ids_and_keep_content_ids_and_labels() -> None:
    toy = Toy(40)
    view = PairingView(toy, paired_fraction=0.5, seed=0)
    samples = derived(view)
    kept_ids = {samples[i].id for i in view.paired_indices.tolist()}
    uni = [samples[i] for i in view.unimodal_indices.tolist()]
    uni_ids = [s.id for s in uni]
    assert len(set(uni_ids)) == len(uni_ids)
    assert not set(uni_ids) & kept_ids
    assert min(uni_ids) > FIRST_ID + 39  # beyond every id of the dataset
    for s in uni:
        (m, value) = next(iter(s.values.items()))
        source = origin_of(value)[0]
        assert s.labels == {"cls": source % 3}
        assert s.modality_ids == {m: source // 2 if m == "b" else FIRST_ID + source}


def test_a_split_sample_and_its_former_partner_share_no_content_id() -> None:
    toy = Toy(20)
    batch = collate(derived(PairingView(toy, paired_fraction=0.0, seed=0)), toy.modalities)
    row_of = {}
    for r in range(batch.size):
        m = "a" if batch.present["a"][r] else "b"
        row_of[origin_of(batch.data[m][r])] = r
    assert len(row_of) == batch.size == 40
    for source in range(20):
        r_a, r_b = row_of[(source, "a")], row_of[(source, "b")]
        assert batch.ids[r_a] != batch.ids[r_b]
        for m in ("a", "b"):
            assert batch.ids_of(m)[r_a] != batch.ids_of(m)[r_b]


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("noise", [0.1, 0.5, 1.0])
def test_noise_rate_is_exact_and_noisy_pairs_are_mismatched(noise: float) -> None:
    toy = Toy(60)
    view = PairingView(toy, paired_fraction=0.5, pair_noise=noise, seed=2)
    kept = view.paired_indices.tolist()
    noisy = set(view.noisy_indices.tolist())
    assert len(noisy) == int(np.floor(noise * len(kept) + 0.5)) and noisy <= set(kept)
    noisy_sources = {view.origin(i).source for i in noisy}
    donors = []
    for i in kept:
        s, origin = view[i], view.origin(i)
        assert s.id == FIRST_ID + origin.source  # noise is invisible: the sample keeps its id
        assert origin_of(s.values["a"]) == (origin.source, "a")
        donor, m = origin_of(s.values["b"])
        assert m == "b"
        if i in noisy:
            assert donor != origin.source and donor in noisy_sources and donor == origin.donor
            assert not torch.equal(s.values["b"], toy.value(origin.source, "b"))
            assert s.modality_ids["b"] == donor // 2  # the content it really holds
            donors.append(donor)
        else:
            assert donor == origin.source and origin.donor is None
    assert sorted(donors) == sorted(noisy_sources)  # a permutation of the noisy pairs
    assert view.noisy_ids.tolist() == sorted(view[i].id for i in noisy)  # the audit's truth, by sample id


def test_noise_on_a_chosen_modality_and_no_noise_without_pairs() -> None:
    view = PairingView(Toy(30, NAMES), paired_fraction=1.0, pair_noise=0.5, seed=0, noise_modality="c")
    for i in view.noisy_indices.tolist():
        s = view[i]
        assert origin_of(s.values["a"])[0] == origin_of(s.values["b"])[0] != origin_of(s.values["c"])[0]
    assert len(PairingView(Toy(30), paired_fraction=0.0, pair_noise=1.0).noisy_indices) == 0


def test_noise_skips_samples_without_a_partner() -> None:
    toy = Toy(28, ("a", "c"), gaps=True)  # every 7th sample holds a only
    view = PairingView(toy, paired_fraction=1.0, pair_noise=1.0, seed=0)
    assert view.noise_modality == "c"
    assert len(view.noisy_indices) == 24
    for i in view.noisy_indices.tolist():
        assert view.origin(i).source % 7 != 0


# ----------------------------------------------------------------------------- determinism, delegation


def fingerprint(view: PairingView) -> list[tuple[int, tuple[tuple[str, tuple[int, str]], ...]]]:
    return [(s.id, tuple(sorted((m, origin_of(v)) for m, v in s.values.items()))) for s in derived(view)]


def test_deterministic_under_a_seed_and_different_under_another() -> None:
    toy = Toy(40)
    one, two, other = (PairingView(toy, 0.5, 0.5, seed=s) for s in (7, 7, 8))
    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(other)
    assert one.noisy_indices.tolist() == two.noisy_indices.tolist()


def test_building_the_view_leaves_the_random_states_alone() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(0)
    np.random.seed(0)
    PairingView(Toy(10), 0.5)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_delegation_and_set_epoch() -> None:
    toy = Toy(10)
    view = PairingView(toy, 0.5)
    view.set_epoch(4)
    assert toy.epochs == [4]
    assert view.modalities == toy.modalities and view.label_names == ("cls",)
    assert view.artifacts() == {"toy.json": "{}"} and view.split == "train"
    with pytest.raises(IndexError):
        view[len(view)]


def test_item_skips_what_it_drops_and_keeps_presence() -> None:
    toy = Toy(20)
    view = PairingView(toy, paired_fraction=0.5, pair_noise=1.0)
    uni = view.unimodal_indices[0].item()
    m = view.origin(uni).modality
    toy.skipped.clear()
    s = view.item(uni)
    assert toy.skipped == [frozenset({"a", "b"} - {m})] and set(s.values) == {m}
    noisy = view.noisy_indices[0].item()
    skipped = view.item(noisy, frozenset({"b"}))
    assert set(skipped.values) == {"a", "b"} and skipped.values["b"] is None


def test_input_view_over_the_pairing_reads_each_rows_content() -> None:
    toy = Toy(20)
    view = PairingView(toy, paired_fraction=0.5, pair_noise=1.0)

    def features(content: int, _view: int) -> torch.Tensor:
        return torch.tensor([float(content), 1.0])

    inputs = InputView(view, {"b": ModalityInput(ModalitySpec("vector", channels=2), features)})
    for i in range(len(view)):
        origin = view.origin(i)
        values = inputs[i].values
        if "b" in values:
            expected = origin.donor if origin.donor is not None else origin.source
            assert int(values["b"][0]) == expected == view.raw_index(i, "b")


def test_previews_follow_the_derived_values() -> None:
    toy = Toy(20)
    view = PairingView(toy, paired_fraction=0.5, pair_noise=1.0)
    uni = view.unimodal_indices[0].item()
    assert set(view.previews(uni)) == {view.origin(uni).modality}
    noisy = view.noisy_indices[0].item()
    donor = view.origin(noisy).donor
    assert donor is not None
    shown = np.asarray(view.previews(noisy)["b"].value)
    assert np.array_equal(shown, np.asarray(toy.previews(donor)["b"].value)) and int(shown[0]) == donor


# ----------------------------------------------------------------------------- collation


def test_collation_marks_presence_of_paired_and_unimodal_rows() -> None:
    toy = Toy(30, NAMES, gaps=True)
    view = PairingView(toy, paired_fraction=0.5, seed=4)
    picks = [*view.paired_indices[:5].tolist(), *view.unimodal_indices[:9].tolist()]
    batch = collate([view[i] for i in picks], toy.modalities)
    for row, i in enumerate(picks):
        origin = view.origin(i)
        for m in NAMES:
            expected = toy.has(origin.source, m) and origin.modality in (None, m)
            assert bool(batch.present[m][row]) == expected
            if expected:
                assert origin_of(batch.data[m][row]) == (origin.source, m)
            else:
                assert not batch.data[m][row].any()


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize("per_batch", [0, 3, 8])
def test_mixed_batches_hold_exactly_the_promised_pairs(per_batch: int) -> None:
    view = PairingView(Toy(40), paired_fraction=0.5, seed=0)  # 20 kept, 40 unimodal
    sampler = MixedBatches(view, batch_size=8, paired_per_batch=per_batch, seed=1)
    batches = list(sampler)
    expected = 40 // (8 - per_batch) if per_batch < 8 else 20 // 8  # the unimodal pool sets the epoch
    assert len(batches) == len(sampler) == expected
    paired = set(view.paired_indices.tolist())
    for b in batches:
        assert len(b) == 8 and sum(i in paired for i in b) == per_batch
    flat = [i for b in batches for i in b]
    unimodal = [i for i in flat if i not in paired]
    assert len(unimodal) == len(set(unimodal))  # each unimodal sample at most once
    uses = [flat.count(i) for i in paired]  # the pairs are cycled evenly
    assert sum(uses) == per_batch * expected and max(uses) - min(uses) <= 1


def test_mixed_batches_shuffle_per_epoch_deterministically() -> None:
    view = PairingView(Toy(40), paired_fraction=0.5, seed=0)
    sampler = MixedBatches(view, 6, 2, seed=3)
    first = list(sampler)
    assert list(MixedBatches(view, 6, 2, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(MixedBatches(view, 6, 2, seed=3, epoch=1)) == list(sampler)
    assert list(MixedBatches(view, 6, 2, seed=4)) != first


def test_plain_batches_shuffle_every_derived_sample() -> None:
    view = PairingView(Toy(40), paired_fraction=0.5, seed=0)  # 60 derived samples
    batches = list(MixedBatches(view, 7, None, seed=0))
    flat = [i for b in batches for i in b]
    assert len(batches) == 60 // 7 and all(len(b) == 7 for b in batches)
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(60))
    assert flat != sorted(flat)


def test_mixed_batches_through_a_data_loader() -> None:
    toy = Toy(40)
    view = PairingView(toy, paired_fraction=0.5, seed=0)
    loader = DataLoader(view, batch_sampler=MixedBatches(view, 10, 4), collate_fn=Collator(view.modalities))
    batches = list(loader)
    assert len(batches) == 40 // 6  # the 40 unimodal samples set the epoch; the 20 pairs are cycled
    for batch in batches:
        both = batch.present["a"] & batch.present["b"]
        assert int(both.sum()) == 4 and bool((batch.present["a"] | batch.present["b"]).all())


@pytest.mark.parametrize("views", [2, 3])
def test_unimodal_views_repeat_each_unimodal_sample_in_its_batch(views: int) -> None:
    view = PairingView(Toy(40), paired_fraction=0.5, seed=0, paired_per_batch=2, unimodal_views=views)
    sampler = MixedBatches(view, 2 + 2 * views, 2, seed=1, views=views)  # 2 pairs + 2 samples x views
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40 // 2  # still one pass over the 40 unimodal samples
    paired = set(view.paired_indices.tolist())
    seen: list[int] = []
    for b in batches:
        unimodal = [i for i in b if i not in paired]
        assert len(b) == 2 + 2 * views and sum(i in paired for i in b) == 2
        assert sorted(unimodal.count(i) for i in set(unimodal)) == [views, views]
        seen += sorted(set(unimodal))
    assert sorted(seen) == sorted(view.unimodal_indices.tolist())  # each unimodal sample in one batch


def test_unimodal_views_are_independent_reads_through_a_loader() -> None:
    class Noisy(Toy):  # an augmentation: every read draws
        def value(self, index: int, m: str) -> torch.Tensor:
            return super().value(index, m) + torch.rand(())

    view = PairingView(Noisy(40), paired_fraction=0.5, seed=0, paired_per_batch=2, unimodal_views=2)
    sampler = MixedBatches(view, 6, 2, views=2)
    batch = next(iter(DataLoader(view, batch_sampler=sampler, collate_fn=Collator(view.modalities))))
    for m, other in (("a", "b"), ("b", "a")):
        alone = batch.present[m] & ~batch.present[other]
        ids = batch.ids[alone]
        for sample in ids.unique():
            rows = batch.data[m][alone][ids == sample]
            assert len(rows) == 2 and not torch.equal(rows[0], rows[1])  # two reads, two draws


@pytest.mark.parametrize(
    ("views", "per_batch", "batch_size"),
    [(0, 2, 6), (2, None, 6), (3, 2, 6), (True, 2, 6)],
)
def test_unimodal_view_errors_name_the_key(views: Any, per_batch: int | None, batch_size: int) -> None:
    with pytest.raises(ConfigError) as err:
        MixedBatches(PairingView(Toy(40), paired_fraction=0.5), batch_size, per_batch, views=views)
    assert err.value.path == "data.unimodal_views"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"paired_fraction": 1.5}, "data.paired_fraction"),
        ({"paired_fraction": -0.1}, "data.paired_fraction"),
        ({"paired_fraction": float("nan")}, "data.paired_fraction"),
        ({"pair_noise": 2}, "data.pair_noise"),
        ({"pair_noise": "0.1"}, "data.pair_noise"),
        ({"paired_per_batch": -1}, "data.paired_per_batch"),
        ({"paired_per_batch": 2.5}, "data.paired_per_batch"),
    ],
)
def test_out_of_range_values_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        PairingView(Toy(10), **kwargs)
    assert err.value.path == key and key in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"paired_fraction": 0.5}, "data.paired_fraction"),
        ({"pair_noise": 0.5}, "data.pair_noise"),
        ({"paired_per_batch": 2}, "data.paired_per_batch"),
    ],
)
def test_a_single_modality_names_the_key_set(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match="two or more modalities") as err:
        PairingView(Toy(10, ("a",)), **kwargs)
    assert err.value.path == key


def test_a_single_noisy_pair_is_refused() -> None:
    with pytest.raises(ConfigError, match="single noisy pair") as err:
        PairingView(Toy(10), pair_noise=0.1)
    assert err.value.path == "data.pair_noise"
    with pytest.raises(ConfigError) as err:
        PairingView(Toy(10), noise_modality="z")
    assert err.value.path == "noise_modality"


@pytest.mark.parametrize(
    ("batch_size", "per_batch", "key"),
    [(8, 9, "data.paired_per_batch"), (8, -1, "data.paired_per_batch"), (8, 8, "data.paired_per_batch")],
)
def test_mixed_batch_errors_name_the_key(batch_size: int, per_batch: int, key: str) -> None:
    view = PairingView(Toy(10), paired_fraction=0.5)  # 5 kept: 8 pairs per batch fill none
    with pytest.raises(ConfigError) as err:
        MixedBatches(view, batch_size, per_batch)
    assert err.value.path == key


def test_plain_batches_larger_than_the_view_name_the_batch_size() -> None:
    with pytest.raises(ConfigError) as err:
        MixedBatches(PairingView(Toy(4), paired_fraction=0.5), 7, None)
    assert err.value.path == "train.batch_size"


# ----------------------------------------------------------------------------- recipes


def recipe_tree(**data: Any) -> dict[str, Any]:
    encoders = {m: {"name": "vector_mlp", "dim": 8, "hidden": 8} for m in ("a", "b")}
    return {
        "data": {"name": "av-digits", **data},
        "model": {"embed_dim": 4, "encoders": encoders},
        "method": {"name": "clip"},
        "train": {"batch_size": 16},
    }


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"paired_fraction": 2}, "data.paired_fraction"),
        ({"pair_noise": -1}, "data.pair_noise"),
        ({"paired_per_batch": "many"}, "data.paired_per_batch"),
        ({"paired_per_batch": 17}, "data.paired_per_batch"),
        ({"unimodal_views": 2}, "data.unimodal_views"),
        ({"unimodal_views": 3, "paired_per_batch": 5}, "data.unimodal_views"),
        ({"unimodal_views": 0, "paired_per_batch": 4}, "data.unimodal_views"),
    ],
)
def test_recipe_validation_names_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_recipe(recipe_tree(**data))
    assert err.value.path == key


def test_recipe_refuses_pairing_of_a_shard_stream() -> None:
    tree = recipe_tree(pair_noise=0.2)
    tree["train"]["shards"] = "/nowhere"
    with pytest.raises(ConfigError) as err:
        validate_recipe(tree)
    assert err.value.path == "data.pair_noise"


def test_recipe_keys_are_documented() -> None:
    lines = "\n".join(describe_keys())
    for key in (
        "data.paired_fraction (float, default 1.0)",
        "data.pair_noise",
        "data.paired_per_batch",
        "data.unimodal_views",
    ):
        assert key in lines


def test_build_dataset_wraps_only_the_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def create(kind: str, name: str, **kwargs: Any) -> Toy:
        seen.append(kwargs)
        return Toy(20)

    monkeypatch.setattr(build, "create", create)
    recipe = validate_recipe(recipe_tree(paired_fraction=0.5, pair_noise=0.2, paired_per_batch=4, test_size=50))
    train, test = build.build_dataset(recipe, "train"), build.build_dataset(recipe, "test")
    assert isinstance(train, PairingView) and isinstance(test, Toy)
    assert len(train.paired_indices) == 10 and len(train.noisy_indices) == 2 and train.paired_per_batch == 4
    assert train.seed == recipe.train.seed
    for kwargs in seen:
        assert not {"paired_fraction", "pair_noise", "paired_per_batch"} & set(kwargs)
        assert kwargs["test_size"] == 50
    plain = validate_recipe(recipe_tree())
    assert isinstance(build.build_dataset(plain, "train"), Toy)


# ----------------------------------------------------------------------------- av-digits


@pytest.fixture(scope="module")
def av_view(data_root: Path) -> PairingView:
    from modalign.data.datasets.av_digits import AVDigits

    return PairingView(AVDigits(root=data_root, split="train", seed=0), 0.5, 0.2, seed=0)


def test_av_digits_counts_and_every_value_once(av_view: PairingView) -> None:
    av = av_view.dataset
    kept = av_view.paired_indices.tolist()
    assert len(kept) == 2500 and len(av_view) == 2500 + 2 * 2500
    assert len(av_view.noisy_indices) == 500 and av_view.noise_modality == "image"
    images = Counter(
        av_view.raw_index(i, "image") for i in range(len(av_view)) if av_view.origin(i).modality != "audio"
    )
    assert images == Counter(range(5000))
    audio = Counter(
        (av_view.origin(i).source, av_view.raw_index(i, "audio"))
        for i in range(len(av_view))
        if av_view.origin(i).modality != "image"
    )
    assert audio == Counter((j, av.raw_index(j, "audio")) for j in range(5000))


def test_av_digits_noisy_pairs_hold_another_image(av_view: PairingView) -> None:
    av = av_view.dataset
    for i in av_view.noisy_indices[:20].tolist():
        origin = av_view.origin(i)
        assert origin.donor is not None and origin.donor != origin.source
        assert not np.array_equal(av.raw_value(origin.donor, "image"), av.raw_value(origin.source, "image"))
        torch.manual_seed(0)
        got = av_view.item(i, frozenset({"audio"}))
        torch.manual_seed(0)
        want = av.item(origin.donor, frozenset({"audio"}))
        assert torch.equal(got.values["image"], want.values["image"]) and got.id == origin.source
        assert got.modality_ids == {"audio": av.raw_index(origin.source, "audio"), "image": origin.donor}


def test_av_digits_mixed_batch_collates(av_view: PairingView) -> None:
    sampler = MixedBatches(av_view, 32, 8, seed=0)
    assert len(sampler) == min(2500 // 8, 5000 // 24)
    batch = collate([av_view[i] for i in next(iter(sampler))], av_view.modalities)
    both = batch.present["audio"] & batch.present["image"]
    assert int(both.sum()) == 8 and int((~both).sum()) == 24
    assert bool((batch.present["audio"] ^ batch.present["image"])[~both].all())
    assert len(set(batch.ids.tolist())) == 32


def test_av_digits_recipe_builds_a_paired_train_split(data_root: Path) -> None:
    overrides = [f"data.root={data_root}", "data.paired_fraction=0.5", "data.test_size=50"]
    recipe = load_recipe("av-digits-clip", overrides)
    train, test = build.build_dataset(recipe, "train"), build.build_dataset(recipe, "test")
    assert isinstance(train, PairingView) and len(train.paired_indices) == 2500 and len(train) == 7500
    assert not isinstance(test, PairingView) and len(test) == 50
