"""Modules of the contrastive family: DCL, VICReg, Barlow, multi-view (CMC/ImageBind), MoCo queues."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core import Batch, ConfigError, ModalitySpec, Outputs, StepContext
from modalign.objectives import (
    DCL,
    BarlowTwins,
    MultiView,
    VICReg,
    barlow_twins_loss,
    dcl_loss,
    infonce_loss,
    multiview_pairs,
    queue_infonce_loss,
    vicreg_loss,
)
from modalign.objectives.momentum import MoCo, ema_update
from modalign.train.build import build_method
from modalign.train.recipe import validate_recipe


def normed(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)


def two_modality_outputs(n: int = 6) -> tuple[Outputs, Batch]:
    raw = {"a": torch.randn(n, 5, dtype=torch.float64), "b": torch.randn(n, 5, dtype=torch.float64)}
    emb = {k: F.normalize(v, dim=-1) for k, v in raw.items()}
    present = {"a": torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)[:n]}
    return Outputs(embeddings=emb, projections=raw), Batch(data={}, present=present, ids=torch.arange(n))


def test_vicreg_and_barlow_modules_use_raw_projections_of_paired_rows() -> None:
    outputs, batch = two_modality_outputs()
    keep = batch.present["a"]
    a, b = outputs.projections["a"][keep], outputs.projections["b"][keep]
    out = VICReg(["a", "b"], sim_weight=2.0, var_weight=3.0, cov_weight=0.5)(outputs, batch)
    want = vicreg_loss(a, b, 2.0, 3.0, 0.5)
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(out.parts["variance"], want.variance)
    out = BarlowTwins(["a", "b"], lambd=0.01)(outputs, batch)
    torch.testing.assert_close(out.loss, barlow_twins_loss(a, b, 0.01))


def test_dcl_module_owns_its_temperature() -> None:
    outputs, batch = two_modality_outputs()
    keep = batch.present["a"]
    obj = DCL(["a", "b"], temperature=0.25)
    out = obj(outputs, batch)
    want = dcl_loss(outputs.embeddings["a"][keep], outputs.embeddings["b"][keep], torch.tensor(math.log(4.0)))
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype))
    out.loss.backward()
    assert obj.scale.logit_scale.grad is not None


# ---- multi-view ----------------------------------------------------------------------------------


def test_multiview_pairs_full_anchored_and_explicit() -> None:
    mods = ["text_en", "image", "text_de"]
    assert multiview_pairs(mods) == [("image", "text_de"), ("image", "text_en"), ("text_de", "text_en")]
    assert multiview_pairs(mods, anchor="image") == [("image", "text_de"), ("image", "text_en")]
    assert multiview_pairs(mods, pairs=[["image", "text_en"]]) == [("image", "text_en")]
    with pytest.raises(ConfigError, match="anchor 'audio'"):
        multiview_pairs(mods, anchor="audio")
    with pytest.raises(ConfigError, match="two or more"):
        multiview_pairs(["image"])
    with pytest.raises(ConfigError, match="distinct pairs"):
        multiview_pairs(mods, pairs=[["image", "text_en"], ["text_en", "image"]])
    with pytest.raises(ConfigError, match=r"outside.*\['audio'\]"):
        multiview_pairs(mods, pairs=[["image", "audio"]])


def test_multiview_is_the_mean_of_pairwise_infonce_on_each_pairs_rows() -> None:
    n = 7
    emb = {m: normed(n, 4, i) for i, m in enumerate(["image", "text_en", "text_de"])}
    present = {
        "image": torch.ones(n, dtype=torch.bool),
        "text_en": torch.tensor([1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
        "text_de": torch.tensor([1, 0, 1, 1, 1, 1, 0], dtype=torch.bool),
    }
    batch = Batch(data={}, present=present, ids=torch.arange(n))
    scale = torch.tensor(math.log(1 / 0.1), dtype=torch.float64)
    for anchor, pairs in ((None, 3), ("image", 2)):
        obj = MultiView(["image", "text_en", "text_de"], anchor=anchor, temperature=0.1)
        out = obj(Outputs(embeddings=emb), batch)
        want = []
        for a, b in multiview_pairs(["image", "text_en", "text_de"], anchor):
            rows = present[a] & present[b]
            want.append(infonce_loss(emb[a][rows], emb[b][rows], scale, torch.arange(n)[rows]))
        assert len(out.parts) == pairs
        torch.testing.assert_close(out.loss, torch.stack(want).mean().to(out.loss.dtype))
        assert out.metrics["paired/image-text_en"] == 6


def test_multiview_skips_pairs_without_data_and_stays_connected() -> None:
    emb = {"image": normed(4, 3, 0).requires_grad_(), "text_en": normed(4, 3, 1)}
    out = MultiView(["image", "text_en", "text_de"])(
        Outputs(embeddings=emb), Batch(data={}, present={}, ids=torch.arange(4))
    )
    assert set(out.parts) == {"image-text_en"}
    emb = {"image": normed(4, 3, 0).requires_grad_()}
    out = MultiView(["image", "text_en", "text_de"])(
        Outputs(embeddings=emb), Batch(data={}, present={}, ids=torch.arange(4))
    )
    assert out.loss.item() == 0.0 and not out.parts
    out.loss.backward()


# ---- MoCo ----------------------------------------------------------------------------------------


def loop_queue_infonce(q: Tensor, k: Tensor, queue: Tensor, scale: Tensor, ids: list[int], qids: list[int]) -> Tensor:
    n, s = q.shape[0], torch.exp(scale)
    total = torch.zeros((), dtype=q.dtype)
    for i in range(n):
        terms = [s * (q[i] * k[j]).sum() for j in range(n) if j == i or ids[j] != ids[i]]
        terms += [s * (q[i] * queue[j]).sum() for j in range(queue.shape[0]) if qids[j] != ids[i]]
        total = total + torch.log(torch.stack(terms).exp().sum()) - s * (q[i] * k[i]).sum()
    return total / n


def test_queue_infonce_matches_loop_reference_value_and_gradient() -> None:
    q, k, queue = normed(5, 4, 1).requires_grad_(), normed(5, 4, 2), normed(6, 4, 3)
    ids, qids = [0, 1, 0, 3, 4], [1, -1, 9, 3, -1, 8]
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    got = queue_infonce_loss(q, k, queue, scale, torch.tensor(ids), torch.tensor(qids))
    want = loop_queue_infonce(q, k, queue, scale, ids, qids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, (q, scale)), torch.autograd.grad(want, (q, scale)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_queue_infonce_with_an_empty_queue_is_infonce_one_way() -> None:
    q, k = normed(6, 3, 4), normed(6, 3, 5)
    s = torch.tensor(1.5, dtype=torch.float64)
    one_way = queue_infonce_loss(q, k, torch.zeros(0, 3, dtype=torch.float64), s)
    both = infonce_loss(q, k, s)
    other = queue_infonce_loss(k, q, torch.zeros(0, 3, dtype=torch.float64), s)
    torch.testing.assert_close((one_way + other) / 2, both)


def test_queue_infonce_keys_get_no_gradient() -> None:
    q, k = normed(4, 3, 6), normed(4, 3, 7).requires_grad_()
    queue_infonce_loss(q.requires_grad_(), k, normed(3, 3, 8), torch.tensor(1.0, dtype=torch.float64)).backward()
    assert k.grad is None


def test_ema_update_step_by_step() -> None:
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, before, s in zip(teacher.parameters(), t0, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s.detach())


SPECS = {"image": ModalitySpec("image", channels=1, size=8), "audio": ModalitySpec("audio", channels=6)}


def moco_method(queue_size: int = 5) -> torch.nn.Module:
    tree = {
        "data": {"name": "av-digits"},
        "model": {
            "embed_dim": 4,
            "encoders": {"image": {"name": "image_cnn", "widths": [4], "dim": 8}, "audio": {"name": "audio_tdnn"}},
        },
        "method": {"name": "moco", "queue_size": queue_size, "momentum": 0.5},
    }
    torch.manual_seed(0)
    return build_method(validate_recipe(tree), SPECS)


def moco_batch(n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        data={"image": torch.randn(n, 1, 8, 8, generator=g), "audio": torch.randn(n, 6, 10, generator=g)},
        present={},
        ids=torch.arange(n) + 100 * seed,
    )


def test_moco_teacher_queue_and_pointer_follow_each_step() -> None:
    method = moco_method(queue_size=5)
    obj = method.objectives["moco"]
    assert isinstance(obj, MoCo) and obj.teacher is not None
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    ctx = StepContext(1, 0, 10, 10)
    for step, n in enumerate([3, 3]):
        batch = moco_batch(n, step + 1)
        teacher_before = [p.detach().clone() for p in obj.teacher.parameters()]
        outputs = method(batch)
        keys = outputs.extras["moco/key_audio"].detach().clone()
        out = method.loss(outputs, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_step(ctx)
        for t, before, s in zip(obj.teacher.parameters(), teacher_before, method.model.parameters(), strict=True):
            torch.testing.assert_close(t, 0.5 * before + 0.5 * s.detach())
        rows = (torch.arange(n) + 3 * step) % 5
        torch.testing.assert_close(obj.queue_audio[rows], keys)
        assert obj.queue_ids_audio[rows].tolist() == batch.ids.tolist()
    assert int(obj.queue_ptr) == 6 % 5
    names = set(method.state_dict())
    assert {"objectives.moco.queue_audio", "objectives.moco.queue_ptr"} <= names
    assert any(n.startswith("objectives.moco.teacher.encoders.image") for n in names)


def test_moco_queue_holds_earlier_keys_as_negatives() -> None:
    method = moco_method(queue_size=8)
    obj = method.objectives["moco"]
    assert isinstance(obj, MoCo)
    batch = moco_batch(4, 1)
    outputs = method(batch)
    scale = obj.scale()
    a, b = outputs.embeddings["audio"], outputs.embeddings["image"]
    ka, kb = outputs.extras["moco/key_audio"], outputs.extras["moco/key_image"]
    want = (
        queue_infonce_loss(a, kb, obj.queue_image, scale, batch.ids, obj.queue_ids_image)
        + queue_infonce_loss(b, ka, obj.queue_audio, scale, batch.ids, obj.queue_ids_audio)
    ) / 2
    torch.testing.assert_close(method.loss(outputs, batch).loss, want)


def loop_distilled(q: Tensor, k: Tensor, tq: Tensor, queue: Tensor, scale: Tensor, alpha: float) -> Tensor:
    """ALBEF's ITC with momentum distillation, written out row by row (all ids distinct)."""
    s = torch.exp(scale)
    gallery = torch.cat([k, queue])
    total = torch.zeros((), dtype=q.dtype)
    for i in range(q.shape[0]):
        logp = torch.log_softmax(torch.stack([s * (q[i] * g).sum() for g in gallery]), dim=0)
        teacher = torch.softmax(torch.stack([s.detach() * (tq[i] * g).sum() for g in gallery]), dim=0)
        target = alpha * teacher + (1 - alpha) * F.one_hot(torch.tensor(i), gallery.shape[0]).double()
        total = total - (target * logp).sum()
    return total / q.shape[0]


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_momentum_distillation_matches_loop_reference(alpha: float) -> None:
    q, k, tq, queue = normed(4, 3, 11).requires_grad_(), normed(4, 3, 12), normed(4, 3, 13), normed(5, 3, 14)
    scale = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    got = queue_infonce_loss(q, k, queue, scale, teacher_q=tq, alpha=alpha)
    want = loop_distilled(q, k, tq, queue, scale, alpha)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, (q, scale)), torch.autograd.grad(want, (q, scale)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_momentum_distillation_gives_same_content_entries_no_mass() -> None:
    q, k, tq, queue = normed(4, 3, 15), normed(4, 3, 16), normed(4, 3, 17), normed(2, 3, 18)
    ids, qids = torch.tensor([0, 0, 1, 2]), torch.tensor([1, -1])
    s = torch.tensor(1.0, dtype=torch.float64)
    got = queue_infonce_loss(q, k, queue, s, ids, qids, teacher_q=tq, alpha=0.5)
    assert torch.isfinite(got)
    plain = queue_infonce_loss(q, k, queue, s, ids, qids)
    assert got.item() != pytest.approx(plain.item())
