"""Retrieval over distinct items: captions of one photo (also from a manifest), a recording of several images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from modalign.core import Batch
from modalign.data.collate import collate
from modalign.data.datasets.manifest import ManifestDataset
from modalign.eval import EmbeddingSet, EvalInputError, embed_loader, evaluate_embeddings, retrieval_metrics
from modalign.eval.items import distinct_rows, item_groups

# Four photos x five captions. Photo k is the unit vector e_k; a caption of photo k at angle
# theta towards photo o is cos(theta) e_k + sin(theta) e_o: it scores cos(theta) against its
# photo, sin(theta) against photo o and 0 against the other two.
CAPTIONS: dict[int, list[tuple[int, int]]] = {  # photo: [(theta in degrees, o), ...]
    0: [(0, 1), (70, 1), (70, 2), (80, 3), (85, 1)],
    1: [(50, 0), (60, 2), (70, 3), (80, 0), (75, 2)],
    2: [(30, 3), (40, 3), (60, 1), (20, 0), (10, 1)],
    3: [(55, 2), (65, 2), (75, 0), (85, 1), (88, 2)],
}
# Hand computation.
# text->image (each caption against the 4 distinct photos): rank 1 when theta < 45 (its photo
# beats photo o), else 2. Rank 1: photo 0's theta=0 and photo 2's 30, 40, 20, 10 -> 5 of 20.
TEXT_TO_IMAGE = {"R@1": 5 / 20, "R@5": 1.0, "R@10": 1.0, "median_rank": 2.0}
# image->text (each distinct photo against all 20 captions; its best caption counts): photo k's
# best caption scores cos(smallest theta) on e_k; every caption of another photo pointing at k
# (o = k) with sin(theta) at or above that is ranked ahead of it.
#   photo 0: best cos 0 = 1; pointing at 0: 50 (.766), 80 (.985), 20 (.342), 75 (.966) -> rank 1
#   photo 1: best cos 50 = .643; pointing at 1: 0 (0), 70 (.940), 85 (.996), 60 (.866),
#            10 (.174), 85 (.996) -> 4 ahead                                           -> rank 5
#   photo 2: best cos 10 = .985; pointing at 2: 70 (.940), 60 (.866), 75 (.966), 55 (.819),
#            65 (.906), 88 (.999) -> 1 ahead                                           -> rank 2
#   photo 3: best cos 55 = .574; pointing at 3: 80 (.985), 70 (.940), 30 (.5), 40 (.643)
#            -> 3 ahead                                                                -> rank 4
IMAGE_TO_TEXT = {"R@1": 1 / 4, "R@5": 1.0, "R@10": 1.0, "median_rank": 3.0}  # ranks 1, 5, 2, 4
# What the repeated gallery used to give for text->image: each of the 15 rank-2 captions sees
# all five copies of photo o ahead of it -> rank 6.
OLD_TEXT_TO_IMAGE = {"R@1": 5 / 20, "R@5": 5 / 20, "R@10": 1.0, "median_rank": 6.0}


def multi_caption_set() -> EmbeddingSet:
    """20 rows (photo, caption), photo ids 10..13; caption content ids 100 + row."""
    photos, captions, ids = [], [], []
    for k, caps in CAPTIONS.items():
        for theta, o in caps:
            photo, caption = torch.zeros(4), torch.zeros(4)
            photo[k] = 1.0
            caption[k], caption[o] = math.cos(math.radians(theta)), math.sin(math.radians(theta))
            photos.append(photo)
            captions.append(caption)
            ids.append(10 + k)
    n = len(ids)
    return EmbeddingSet(
        embeddings={"image": torch.stack(photos), "text": torch.stack(captions)},
        present={"image": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool)},
        ids=torch.tensor(ids),
        labels={},
        content_ids={"text": 100 + torch.arange(n)},
    )


def pick(metrics: dict[str, float], direction: str) -> dict[str, float]:
    return {k: metrics[f"{direction}/{k}"] for k in ("R@1", "R@5", "R@10", "median_rank")}


def test_multi_caption_protocol_matches_hand_computation() -> None:
    metrics = evaluate_embeddings(None, multi_caption_set(), label=None)
    assert pick(metrics, "text->image") == pytest.approx(TEXT_TO_IMAGE)
    assert pick(metrics, "image->text") == pytest.approx(IMAGE_TO_TEXT)


def test_repeated_gallery_is_what_the_protocol_fixes() -> None:
    es = multi_caption_set()
    old = retrieval_metrics(es.embeddings["text"], es.embeddings["image"], es.ids, es.ids)
    assert {k: old[k] for k in OLD_TEXT_TO_IMAGE} == pytest.approx(OLD_TEXT_TO_IMAGE)


def test_row_order_and_chunks_do_not_matter() -> None:
    es = multi_caption_set()
    perm = torch.randperm(len(es), generator=torch.Generator().manual_seed(0))
    shuffled = EmbeddingSet(
        {m: e[perm] for m, e in es.embeddings.items()},
        {m: p[perm] for m, p in es.present.items()},
        es.ids[perm],
        {},
        {m: c[perm] for m, c in es.content_ids.items()},
    )
    assert evaluate_embeddings(None, shuffled, None, chunk_size=3) == evaluate_embeddings(None, es, None)


def test_one_recording_for_several_images() -> None:
    """av-digits layout: unique image ids, a recording shared by several images (content id)."""
    # Recordings r0 = e0, r1 = e1; images 0, 1 use r0, images 2, 3, 4 use r1.
    images = torch.tensor([[1.0, 0.2], [0.2, 1.0], [0.0, 1.0], [1.0, 0.1], [0.3, 1.0]])
    audio = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    es = EmbeddingSet(
        {"image": images, "audio": audio},
        {m: torch.ones(5, dtype=torch.bool) for m in ("image", "audio")},
        torch.arange(5),
        {"digit": torch.tensor([0, 0, 1, 1, 1])},
        {"audio": torch.tensor([0, 0, 1, 1, 1])},
    )
    metrics = evaluate_embeddings(None, es, label="digit")
    # image->audio against the 2 distinct recordings (normalised images: 0 (.981, .196),
    # 1 (.196, .981), 2 (0, 1), 3 (.995, .0995), 4 (.287, .958)): images 0, 2, 4 rank theirs
    # first; image 1 (r0) is nearer r1 and image 3 (r1) nearer r0 -> ranks 1, 2, 1, 2, 1.
    assert metrics["image->audio/R@1"] == pytest.approx(3 / 5)
    assert metrics["image->audio/median_rank"] == 1.0
    # audio->image, one query per recording: r0 scores images .981, .196, 0, .995, .287; its
    # images 0 and 1 are relevant, image 3 is ahead of image 0 -> rank 2. r1 scores .196, .981,
    # 1, .0995, .958: its image 2 is first -> rank 1.
    assert metrics["audio->image/R@1"] == pytest.approx(1 / 2)
    assert metrics["audio->image/median_rank"] == pytest.approx(1.5)
    # Class match over the same distinct items (digit = recording here).
    assert metrics["image->audio/p@1"] == pytest.approx(3 / 5)
    assert metrics["audio->image/p@1"] == pytest.approx(1 / 2)
    # AP of r0: relevant at ranks 2 and 4 -> (1/2 + 2/4) / 2; of r1: ranks 1, 3, 5.
    assert metrics["audio->image/mAP"] == pytest.approx((0.5 + (1 + 2 / 3 + 3 / 5) / 3) / 2)


def brute_force(es: EmbeddingSet, a: str, b: str) -> np.ndarray:
    """Ranks a -> b by a direct loop: distinct items, relevant = paired in some row."""
    ca, cb = es.content_of(a).tolist(), es.content_of(b).tolist()
    qa = {c: i for i, c in reversed(list(enumerate(ca)))}
    gb = {c: i for i, c in reversed(list(enumerate(cb)))}
    pairs = set(zip(ca, cb, strict=True))
    unit = {m: torch.nn.functional.normalize(es.embeddings[m], dim=1) for m in (a, b)}
    ranks = []
    for x, qi in qa.items():
        scores = {y: float(unit[a][qi] @ unit[b][gi]) for y, gi in gb.items()}
        best = max(s for y, s in scores.items() if (x, y) in pairs)
        ranks.append(1 + sum(s >= best for y, s in scores.items() if (x, y) not in pairs))
    return np.array(ranks)


def test_random_one_to_many_layout_equals_a_direct_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    photos = torch.randn(30, 6, generator=gen)
    owner = torch.randint(0, 30, (90,), generator=gen)  # 90 captions over (at most) 30 photos
    n = len(owner)
    es = EmbeddingSet(
        {"image": photos[owner], "text": photos[owner] + 0.8 * torch.randn(n, 6, generator=gen)},
        {m: torch.ones(n, dtype=torch.bool) for m in ("image", "text")},
        owner,
        {},
        {"text": torch.arange(n) + 1000},
    )
    metrics = evaluate_embeddings(None, es, None, chunk_size=7)
    for a, b in (("image", "text"), ("text", "image")):
        ranks = brute_force(es, a, b)
        assert metrics[f"{a}->{b}/R@1"] == pytest.approx(float(np.mean(ranks <= 1)))
        assert metrics[f"{a}->{b}/R@5"] == pytest.approx(float(np.mean(ranks <= 5)))
        assert metrics[f"{a}->{b}/median_rank"] == pytest.approx(float(np.median(ranks)))


def test_unique_items_keep_the_row_metrics() -> None:
    """Without repeats the protocol is the plain one: one query and one gallery entry per row."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 8, generator=gen)
    es = EmbeddingSet(
        {"image": x, "text": x + torch.randn(40, 8, generator=gen)},
        {m: torch.ones(40, dtype=torch.bool) for m in ("image", "text")},
        torch.arange(40) * 7,
        {},
    )
    metrics = evaluate_embeddings(None, es, None)
    plain = retrieval_metrics(es.embeddings["image"], es.embeddings["text"])
    assert pick(metrics, "image->text") == {k: plain[k] for k in ("R@1", "R@5", "R@10", "median_rank")}


def test_item_groups_and_distinct_rows() -> None:
    ids = torch.tensor([5, 5, 6, 7, 8])
    audio = torch.tensor([1, 2, 2, 3, 9])  # rows 1 and 2 share a recording: 5 ~ 6 through it
    assert item_groups(ids, ids, audio).tolist() == [0, 0, 0, 3, 4]
    assert distinct_rows(torch.tensor([4, 4, 1, 4, 1, 0])).tolist() == [0, 2, 5]
    with pytest.raises(EvalInputError):
        distinct_rows(torch.zeros(0, dtype=torch.long))
    with pytest.raises(EvalInputError):
        item_groups(ids, torch.zeros(3, dtype=torch.long))


def test_content_ids_are_validated() -> None:
    es = multi_caption_set()
    bad: dict[str, Tensor] = {"video": es.ids}
    with pytest.raises(EvalInputError, match="no such modality"):
        EmbeddingSet(es.embeddings, es.present, es.ids, {}, bad)
    assert es.subset(es.ids == 11).content_of("text").tolist() == list(range(105, 110))


def _manifest(folder: Path) -> tuple[Path, list[Tensor]]:
    """4 photos x 5 captions (rows sharing the photo's id); returns the file and each row's caption vector."""
    rows, vectors = [], []
    for k, caps in CAPTIONS.items():
        Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(folder / f"p{k}.png")
        for j, (theta, o) in enumerate(caps):
            rows.append({"id": f"photo-{k}", "photo": f"p{k}.png", "caption": f"photo {k} caption {j}"})
            v = torch.zeros(4)
            v[k], v[o] = math.cos(math.radians(theta)), math.sin(math.radians(theta))
            vectors.append(v)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, vectors


class LookupEmbedder:
    """Hand-made embeddings looked up by content id (``Batch.ids_of``)."""

    modalities = ("caption", "photo")

    def __init__(self, table: dict[str, dict[int, Tensor]]) -> None:
        self.table = table

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        return {m: torch.stack([self.table[m][int(c)] for c in batch.ids_of(m)]) for m in self.modalities}


def test_manifest_with_five_captions_per_photo(tmp_path: Path) -> None:
    path, vectors = _manifest(tmp_path)
    ds = ManifestDataset(
        train_file=str(path), test_file=str(path), modalities={"photo": "image", "caption": "text"}, image_size=8
    )
    samples = [ds[i] for i in range(len(ds))]
    assert all("photo" not in s.modality_ids for s in samples)  # one photo per id: the sample id
    captions = [s.modality_ids["caption"] for s in samples]
    assert len(set(captions)) == 20 and not set(captions) & {s.id for s in samples}
    photos = {samples[5 * k].id: torch.eye(4)[k] for k in CAPTIONS}  # rows 5k..5k+4 are photo k's
    table = {"caption": dict(zip(captions, vectors, strict=True)), "photo": photos}
    loader = DataLoader(ds, batch_size=6, collate_fn=lambda b: collate(b, ds.modalities))
    es = embed_loader(LookupEmbedder(table), loader)
    assert torch.equal(es.content_of("caption"), torch.tensor(captions))
    metrics = evaluate_embeddings(None, es, label=None)
    assert pick(metrics, "caption->photo") == pytest.approx(TEXT_TO_IMAGE)
    assert pick(metrics, "photo->caption") == pytest.approx(IMAGE_TO_TEXT)


def test_repeated_caption_is_one_item_and_unique_ids_get_no_content_ids(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    rows = [
        {"id": 1, "photo": "p.png", "caption": "a cat"},
        {"id": 1, "photo": "p.png", "caption": "a cat"},
        {"id": 1, "photo": "p.png", "caption": "a grey cat"},
        {"id": 2, "photo": "p.png", "caption": "a cat"},
        {"id": 3, "photo": "p.png", "caption": "a dog"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(train_file=str(path), test_file=str(path), image_size=8)
    got = [ds[i].modality_ids for i in range(len(ds))]
    assert got[0]["caption"] == got[1]["caption"] != got[2]["caption"]
    assert got[3] == got[4] == {} and all("photo" not in g for g in got)
