"""Per-modality content ids through collation (``Sample.modality_ids`` -> ``Batch.ids_of``)."""

from __future__ import annotations

import torch

from modalign.core import ModalitySpec, Sample
from modalign.data.collate import collate

SPECS = {"audio": ModalitySpec("audio", channels=2), "image": ModalitySpec("image", channels=1)}


def sample(i: int, rec: int | None) -> Sample:
    ids = {"audio": rec} if rec is not None else {}
    values = {"image": torch.zeros(1, 2, 2), "audio": torch.zeros(2, 3)}
    return Sample(id=i, values=values, modality_ids=ids)


def test_modality_ids_fall_back_to_the_sample_id() -> None:
    batch = collate([sample(0, 7), sample(1, 7), sample(2, None)], SPECS)
    assert batch.ids_of("audio").tolist() == [7, 7, 2]
    assert batch.ids_of("image").tolist() == [0, 1, 2]
    moved = batch.to("cpu").select(["audio"])
    assert moved.ids_of("audio").tolist() == [7, 7, 2]


def test_without_modality_ids_every_modality_uses_the_sample_id() -> None:
    batch = collate([sample(3, None), sample(4, None)], SPECS)
    assert batch.modality_ids == {}
    assert torch.equal(batch.ids_of("audio"), batch.ids)


def test_av_digits_names_the_recording_as_the_audio_id(data_root) -> None:
    from modalign.data.datasets.av_digits import AVDigits

    ds = AVDigits(root=data_root, split="test", test_size=50)
    s = ds[3]
    assert ds.recording_name(3) == ds._recs[s.modality_ids["audio"]][0]
