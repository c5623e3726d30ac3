"""data2vec: the EMA teacher, its targets, masking of the student, the momentum schedule, resume.

Targets against NumPy and against the teacher's blocks run by hand (no hooks), the EMA step by
step against its formula, the teacher in the checkpoint, bind errors. The loss maths and masking
helpers shared with MultiMAE are tested in ``test_masked.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.core.types import StepContext
from modalign.methods import Method
from modalign.nn.layers import self_attend
from modalign.objectives import Data2Vec, data2vec_targets, ema_update
from modalign.train.build import build_method
from modalign.train.checkpoint import load_weights, save_checkpoint
from modalign.train.recipe import validate_recipe
from support.masked import expected_count, perturb_masked, stem_valid

SPECS = {"image": ModalitySpec("image", channels=1, size=8), "audio": ModalitySpec("audio", channels=6)}
ENCODERS = {
    "image": {"name": "image_vit", "patch": 4, "dim": 16, "depth": 2, "heads": 2},
    "audio": {"name": "audio_transformer", "patch": 2, "dim": 16, "depth": 3, "heads": 2},
}


def build(method: dict, seed: int = 0, **encoders: dict) -> Method:
    entries = {m: encoders.get(m, ENCODERS[m]) for m in ("audio", "image")}
    tree = {"data": {"name": "av-digits"}, "model": {"embed_dim": 8, "encoders": entries}, "method": method}
    torch.manual_seed(seed)
    return build_method(validate_recipe(tree), SPECS)


def make_batch(n: int = 6, seed: int = 0, absent: dict[str, list[int]] | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 7, 10, 4, 9, 2, 10, 5])[:n]
    present = {m: torch.ones(n, dtype=torch.bool) for m in ("image", "audio")}
    for m, rows in (absent or {}).items():
        present[m][rows] = False
    return Batch(
        data={"image": torch.randn(n, 1, 8, 8, generator=g), "audio": torch.randn(n, 6, 10, generator=g)},
        present=present,
        ids=torch.arange(n),
        padding={"audio": torch.arange(10)[None] >= lengths[:, None]},
    )


def test_data2vec_targets_average_layer_normalised_outputs() -> None:
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * (k + 1) + k for k in range(3)]
    want = np.zeros((2, 3, 4))
    for y in layers:
        a = y.numpy()
        want += (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5) / 3
    np.testing.assert_allclose(data2vec_targets(layers).numpy(), want, rtol=1e-10, atol=1e-12)


def test_instance_norm_targets_normalise_each_feature_over_the_valid_tokens() -> None:
    g = torch.Generator().manual_seed(4)
    layers = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(2)]
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    want = np.zeros((2, 5, 3))
    for y in layers:
        for b, n in enumerate([5, 3]):
            a = y[b].numpy()
            want[b] += (a - a[:n].mean(0)) / np.sqrt(a[:n].var(0) + 1e-5) / 2
    got = data2vec_targets(layers, "instance", padding)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


DATA2VEC = {"name": "data2vec", "top_k": 2, "tau0": 0.9, "tau1": 0.99, "mask_ratio": 0.5}


def test_teacher_is_a_frozen_copy_in_the_state_dict_without_gradient() -> None:
    method = build(DATA2VEC)
    objective = method.objectives["data2vec"]
    assert isinstance(objective, Data2Vec)
    for m in ("image", "audio"):
        teacher, student = objective.teachers[m], method.model.encoders[m]
        assert teacher is not student and not teacher.training
        for (n, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters(), strict=True):
            assert torch.equal(t, s) and t.data_ptr() != s.data_ptr() and not t.requires_grad, n
    assert any(k.startswith("objectives.data2vec.teachers.audio.") for k in method.state_dict())
    batch = make_batch()
    method.train()
    assert not objective.teachers["image"].training
    method.loss(method(batch), batch).loss.backward()
    assert all(p.grad is None for p in objective.teachers.parameters())
    assert all(p.grad is not None for p in method.model.encoders.parameters())


def manual_targets(encoder: nn.Module, x: Tensor, padding: Tensor, top_k: int, stack: bool = False):
    """Teacher targets by running the audio transformer's blocks by hand (no hooks)."""
    h, pad = encoder.stem(x, padding)
    ffn = []
    for block in encoder.transformer.blocks:
        h = h + self_attend(block.attn, block.norm1(h), pad)
        f = block.mlp(block.norm2(h))
        ffn.append(f)
        h = h + f
    if stack:
        return [y.double() for y in ffn[-top_k:]]
    return sum(F.layer_norm(y, y.shape[-1:]) for y in ffn[-top_k:]) / top_k


def test_data2vec_targets_are_the_teachers_top_k_ffn_outputs_and_masked_inputs_stay_hidden() -> None:
    method = build(DATA2VEC)
    batch = make_batch(absent={"audio": [3]})
    objective = method.objectives["data2vec"]
    torch.manual_seed(6)
    extras = method(batch).extras
    mask = extras["data2vec/audio/mask"]
    assert not mask[3].any()
    with torch.no_grad():
        want = manual_targets(objective.teachers["audio"], batch.data["audio"], batch.padding["audio"], 2)
    torch.testing.assert_close(extras["data2vec/audio/target"], want[mask])
    valid = stem_valid(method, batch, "image")
    assert [int(v) for v in extras["data2vec/image/mask"].sum(1)] == [expected_count(int(n), 0.5) for n in valid.sum(1)]
    perturbed = perturb_masked(batch, extras["data2vec/image/mask"], mask)
    torch.manual_seed(6)
    again = method(perturbed).extras
    for m in ("image", "audio"):
        torch.testing.assert_close(again[f"data2vec/{m}/pred"], extras[f"data2vec/{m}/pred"])


def test_pooled_output_regresses_the_mean_target_with_its_weight() -> None:
    method = build({**DATA2VEC, "pooled_weight": 0.5, "target_norm": "instance"})
    batch = make_batch(absent={"audio": [3]})
    out = method(batch)
    loss = method.loss(out, batch)
    e = out.extras
    with torch.no_grad():
        teacher = method.objectives["data2vec"].teachers["audio"]
        layers = []  # the teacher's top-2 FFN outputs, instance-normalised over valid tokens
        for y in manual_targets(teacher, batch.data["audio"], batch.padding["audio"], 2, stack=True):
            valid = (~teacher.stem(batch.data["audio"], batch.padding["audio"])[1]).double()[..., None]
            mean = (y * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
            var = ((y - mean) ** 2 * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
            layers.append((y - mean) / torch.sqrt(var + 1e-5))
        target = sum(layers) / 2
        mean_target = (target * valid).sum(1) / valid.sum(1)
    keep = torch.tensor([0, 1, 2, 4, 5])
    torch.testing.assert_close(e["data2vec/audio_pooled/target"], mean_target[keep].float())
    assert torch.equal(e["data2vec/audio_pooled/row"], keep)
    pooled = [
        F.smooth_l1_loss(e[f"data2vec/{m}_pooled/pred"], e[f"data2vec/{m}_pooled/target"]) for m in ("audio", "image")
    ]
    torch.testing.assert_close(loss.parts["data2vec/audio_pooled"], pooled[0])
    want = loss.parts["data2vec/audio"] + loss.parts["data2vec/image"] + 0.5 * (pooled[0] + pooled[1])
    torch.testing.assert_close(loss.loss, want)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="K >= 1"):
        data2vec_targets([])
    with pytest.raises(ValueError, match="norm must be"):
        data2vec_targets([torch.zeros(1, 2, 3)], norm="batch")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


def test_ema_update_formula_and_buffers() -> None:
    torch.manual_seed(0)
    teacher, student = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.weight.data.uniform_(), student.running_mean.uniform_()
    t0 = teacher.weight.detach().clone()
    ema_update(teacher, student, 0.7)
    torch.testing.assert_close(teacher.weight, 0.7 * t0 + 0.3 * student.weight)
    torch.testing.assert_close(teacher.running_mean, student.running_mean)


def test_after_step_moves_the_teacher_with_the_scheduled_momentum() -> None:
    method = build(DATA2VEC)
    objective = method.objectives["data2vec"]
    assert isinstance(objective, Data2Vec)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    total = 4
    for step in range(1, total):
        batch = make_batch(seed=step)
        opt.zero_grad()
        method.loss(method(batch), batch).loss.backward()
        opt.step()
        before = {m: [p.detach().clone() for p in objective.teachers[m].parameters()] for m in ("image", "audio")}
        method.after_step(StepContext(step=step, epoch=0, total_steps=total, steps_per_epoch=total))
        tau = 0.9 + (0.99 - 0.9) * step / total
        for m in ("image", "audio"):
            students = list(method.model.encoders[m].parameters())
            for old, new, s in zip(before[m], objective.teachers[m].parameters(), students, strict=True):
                torch.testing.assert_close(new, tau * old + (1 - tau) * s)
    assert objective.momentum(0.0) == pytest.approx(0.9) and objective.momentum(1.0) == pytest.approx(0.99)


def test_resume_restores_the_teacher(tmp_path: Path) -> None:
    method = build(DATA2VEC)
    with torch.no_grad():
        for p in method.model.encoders.parameters():
            p.add_(1.0)
    method.after_step(StepContext(step=1, epoch=0, total_steps=2, steps_per_epoch=2))
    folder = save_checkpoint(tmp_path, "epoch-0001", method, {})
    fresh = build(DATA2VEC)
    teacher = fresh.objectives["data2vec"].teachers
    old = [p.detach().clone() for p in teacher.parameters()]
    load_weights(folder, fresh)
    saved = method.objectives["data2vec"].teachers.parameters()
    for a, b, o in zip(teacher.parameters(), saved, old, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, o)


def test_data2vec_bind_errors() -> None:
    with pytest.raises(ConfigError, match=r"top_k.*has 2 blocks, top_k=3"):
        build({**DATA2VEC, "top_k": 3})
    with pytest.raises(ConfigError, match="image_cnn has no token stem"):
        build(DATA2VEC, image={"name": "image_cnn", "widths": [4], "dim": 8})
    with pytest.raises(ConfigError, match=r"method\.tau1: must be in \[0, 1\]"):
        build({**DATA2VEC, "tau1": 1.5})
