"""Masked prediction: MultiMAE, masked modelling with a context, data2vec.

Reference tests of the losses (NumPy float64 and explicit loops, value and gradient), masking
properties (exact ratio per row, masked content never reaches the trunk), the EMA teacher step
by step, checkpointing of the teacher, bind errors, and tiny end-to-end runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.core.types import StepContext
from modalign.methods import Method
from modalign.nn.layers import self_attend
from modalign.objectives import (
    Data2Vec,
    MaskedConditional,
    data2vec_targets,
    ema_update,
    masked_regression_loss,
    masked_token_loss,
    random_mask,
)
from modalign.objectives.masked import bert_corrupt, dirichlet_ratios, per_row_mean, visible_index
from modalign.train.build import build_method
from modalign.train.checkpoint import load_weights, save_checkpoint
from modalign.train.recipe import expand_method, validate_recipe

VOCAB = 30  # [PAD]=0 [UNK]=1 [CLS]=2, regular 3..26, [MASK]=27 [BOS]=28 [EOS]=29
SPECS = {
    "image": ModalitySpec("image", channels=1, size=8),
    "audio": ModalitySpec("audio", channels=6),
    "text": ModalitySpec("text", vocab_size=VOCAB),
}
ENCODERS = {
    "image": {"name": "image_vit", "patch": 4, "dim": 16, "depth": 2, "heads": 2},
    "audio": {"name": "audio_transformer", "patch": 2, "dim": 16, "depth": 3, "heads": 2},
    "text": {"name": "text_transformer", "dim": 16, "depth": 1, "heads": 2, "max_len": 8},
}


def build(method: dict, modalities: tuple[str, ...] = ("audio", "image"), seed: int = 0, **encoders: dict) -> Method:
    entries = {m: encoders.get(m, ENCODERS[m]) for m in modalities}
    tree = {"data": {"name": "av-digits"}, "model": {"embed_dim": 8, "encoders": entries}, "method": method}
    torch.manual_seed(seed)
    return build_method(validate_recipe(tree), SPECS)


def make_batch(n: int = 6, seed: int = 0, absent: dict[str, list[int]] | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 7, 10, 4, 9, 2, 10, 5])[:n]
    text = torch.randint(3, VOCAB - 3, (n, 7), generator=g)
    text[:, 0] = 2  # [CLS]
    text_len = torch.tensor([7, 3, 5, 2, 7, 4, 6, 1])[:n]
    text[torch.arange(7)[None] >= text_len[:, None]] = 0
    present = {m: torch.ones(n, dtype=torch.bool) for m in ("image", "audio", "text")}
    for m, rows in (absent or {}).items():
        present[m][rows] = False
    return Batch(
        data={"image": torch.randn(n, 1, 8, 8, generator=g), "audio": torch.randn(n, 6, 10, generator=g), "text": text},
        present=present,
        ids=torch.arange(n),
        padding={"audio": torch.arange(10)[None] >= lengths[:, None], "text": text == 0},
    )


def expected_count(n: int, ratio: float) -> int:
    if n == 0:
        return 0
    return min(max(1, math.floor(ratio * n + 0.5)), max(n - 1, 1))


# ---------------------------------------------------------------------------------------------
# The losses against references


def np_regression(pred: np.ndarray, target: np.ndarray, rows: list[int], normalize: bool, kind: str, beta: float):
    per_row: dict[int, list[float]] = {}
    for i, r in enumerate(rows):
        t = target[i]
        if normalize:
            t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
        d = np.abs(pred[i] - t)
        loss = np.mean(d**2) if kind == "mse" else np.mean(np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta))
        per_row.setdefault(r, []).append(float(loss))
    return float(np.mean([np.mean(v) for v in per_row.values()]))


def loop_regression(pred: Tensor, target: Tensor, rows: list[int], normalize: bool, kind: str, beta: float) -> Tensor:
    """The same formula with scalar torch operations (for autograd)."""
    per_row: dict[int, list[Tensor]] = {}
    for i, r in enumerate(rows):
        t = target[i]
        if normalize:
            mean = sum(t[j] for j in range(len(t))) / len(t)
            var = sum((t[j] - mean) ** 2 for j in range(len(t))) / (len(t) - 1)
            t = (t - mean) / torch.sqrt(var + 1e-6)
        terms = []
        for j in range(len(t)):
            d = pred[i, j] - t[j]
            if kind == "mse":
                terms.append(d * d)
            else:
                terms.append(0.5 * d * d / beta if abs(float(d.detach())) < beta else d.abs() - 0.5 * beta)
        per_row.setdefault(r, []).append(sum(terms) / len(terms))
    means = [sum(v) / len(v) for v in per_row.values()]
    return sum(means) / len(means)


ROWS = [0, 0, 2, 2, 2, 5, 7]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("kind", "beta"), [("mse", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 0.3)])
def test_regression_loss_value_and_gradient_match_references(normalize: bool, kind: str, beta: float) -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_()
    target = 2.0 * torch.randn(7, 5, generator=g, dtype=torch.float64) + 1.0
    rows = torch.tensor(ROWS)
    loss = masked_regression_loss(pred, target, rows, normalize, kind, beta)
    want = np_regression(pred.detach().numpy(), target.numpy(), ROWS, normalize, kind, beta)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    (got,) = torch.autograd.grad(loss, pred)
    (ref,) = torch.autograd.grad(loop_regression(pred, target, ROWS, normalize, kind, beta), pred)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda p: masked_regression_loss(p, target, rows, normalize, kind, beta), (pred,))


def test_regression_target_gets_no_gradient() -> None:
    pred = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3, requires_grad=True)
    masked_regression_loss(pred, target, torch.tensor([0, 1, 1, 2])).backward()
    assert target.grad is None and pred.grad is not None


def test_token_loss_value_and_gradient_match_references() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 6, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.tensor([0, 5, 2, 2, 1, 4, 3])
    rows = torch.tensor(ROWS)
    loss = masked_token_loss(logits, target, rows)
    z = logits.detach().numpy()
    per_row: dict[int, list[float]] = {}
    for i, r in enumerate(ROWS):
        per_row.setdefault(r, []).append(float(np.log(np.exp(z[i]).sum()) - z[i, target[i]]))
    assert loss.item() == pytest.approx(np.mean([np.mean(v) for v in per_row.values()]), rel=1e-12)
    loop_rows: dict[int, list[Tensor]] = {}
    for i, r in enumerate(ROWS):
        loop_rows.setdefault(r, []).append(
            torch.log(sum(torch.exp(logits[i, j]) for j in range(6))) - logits[i, target[i]]
        )
    ref = sum(sum(v) / len(v) for v in loop_rows.values()) / len(loop_rows)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_per_row_mean_weights_rows_not_positions() -> None:
    values = torch.tensor([1.0, 1.0, 1.0, 5.0])
    assert per_row_mean(values, torch.tensor([3, 3, 3, 8])).item() == pytest.approx(3.0)
    assert values.mean().item() == pytest.approx(2.0)  # a mean over positions would differ


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 30), n_rows=st.integers(2, 8))
def test_a_split_batch_gives_the_row_weighted_mean_of_its_parts(seed: int, m: int, n_rows: int) -> None:
    """Per-sample losses: any split of the rows (e.g. over ranks) recombines by row counts."""
    g = torch.Generator().manual_seed(seed)
    pred, target = (
        torch.randn(m, 4, generator=g, dtype=torch.float64),
        torch.randn(m, 4, generator=g, dtype=torch.float64),
    )
    rows = torch.randint(0, n_rows, (m,), generator=g)
    first = torch.rand(n_rows, generator=g) < 0.5
    whole = masked_regression_loss(pred, target, rows)
    parts, weights = [], []
    for side in (first, ~first):
        keep = side[rows]
        if keep.any():
            parts.append(masked_regression_loss(pred[keep], target[keep], rows[keep]))
            weights.append(int(torch.unique(rows[keep]).numel()))
    recombined = sum(w * p for w, p in zip(weights, parts, strict=True)) / sum(weights)
    torch.testing.assert_close(whole, recombined)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: masked_regression_loss(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3).long()), r"\[M, P\]"),
        (lambda: masked_regression_loss(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0).long()), "M == 0"),
        (
            lambda: masked_regression_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1).long(), kind="l3"),
            "kind",
        ),
        (lambda: masked_token_loss(torch.zeros(3, 5), torch.zeros(2).long(), torch.zeros(3).long()), r"\[M, V\]"),
        (lambda: per_row_mean(torch.zeros(3), torch.zeros(2).long()), r"rows \[M\]"),
        (lambda: random_mask(torch.ones(2, 3, dtype=torch.bool), 1.0), r"\(0, 1\)"),
        (lambda: data2vec_targets([]), "K >= 1"),
        (lambda: ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5), r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


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


# ---------------------------------------------------------------------------------------------
# Masking helpers


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), t=st.integers(1, 12), ratio=st.floats(0.05, 0.95))
def test_random_mask_masks_exactly_the_ratio_of_valid_positions(seed: int, b: int, t: int, ratio: float) -> None:
    valid = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.7
    torch.manual_seed(seed)
    mask = random_mask(valid, ratio)
    assert not (mask & ~valid).any()
    for row in range(b):
        assert int(mask[row].sum()) == expected_count(int(valid[row].sum()), ratio)
    torch.manual_seed(seed)
    assert torch.equal(random_mask(valid, ratio), mask)  # drawn from the (seeded) global generator


def test_random_mask_is_uniform_over_positions() -> None:
    torch.manual_seed(0)
    valid = torch.ones(4000, 5, dtype=torch.bool)
    freq = random_mask(valid, 0.4).float().mean(dim=0)  # 2 of 5 per row
    torch.testing.assert_close(freq, torch.full((5,), 0.4), atol=0.03, rtol=0)


def test_visible_index_gathers_visible_tokens_in_order() -> None:
    hidden = torch.tensor([[True, False, True, False, False], [True, True, True, False, True]])
    index, padding = visible_index(hidden)
    assert index.shape == (2, 3)
    assert index[0].tolist() == [1, 3, 4] and index[1, 0].item() == 3
    assert padding.tolist() == [[False, False, False], [False, True, True]]
    assert not hidden.gather(1, index)[~padding].any()


def test_bert_corrupt_80_10_10() -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 20, (200, 100))
    mask = torch.rand(200, 100) < 0.5
    out = bert_corrupt(ids, mask, 27, 3, 20)
    assert torch.equal(out[~mask], ids[~mask])
    at = out[mask]
    frac_mask = (at == 27).float().mean().item()
    changed = ((at != 27) & (at != ids[mask])).float().mean().item()
    assert frac_mask == pytest.approx(0.8, abs=0.015)
    assert changed == pytest.approx(0.1 * 16 / 17, abs=0.015)  # a random id equal to the original is "unchanged"
    assert int(at[at != 27].min()) >= 3 and int(at[at != 27].max()) < 20
    assert torch.equal(bert_corrupt(ids, mask, 27, 3, 20, 1.0, 0.0)[mask], torch.full_like(ids[mask], 27))


# ---------------------------------------------------------------------------------------------
# MultiMAE


MULTIMAE = {"name": "multimae", "decoder_dim": 16, "decoder_heads": 2, "decoder_depth": 1, "mask_ratio": 0.5}


def stem_valid(method: Method, batch: Batch, m: str) -> Tensor:
    """``BoolTensor[B, T]`` of the stem tokens that exist (observed row, not padded)."""
    tokens, padding = method.model.encoders[m].stem(batch.data[m], batch.padding.get(m))
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool) if padding is None else ~padding
    return valid & batch.rows(m)[:, None]


def perturb_masked(batch: Batch, image_mask: Tensor, audio_mask: Tensor) -> Batch:
    """A copy of ``batch`` whose masked image patches (4x4) and audio frames (2 per token) are noise."""
    image, audio = batch.data["image"].clone(), batch.data["audio"].clone()
    for b, t in image_mask.nonzero().tolist():
        r, c = divmod(t, 2)
        image[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 5.0 * torch.randn(1, 4, 4)
    for b, t in audio_mask.nonzero().tolist():
        audio[b, :, 2 * t : 2 * t + 2] += 5.0 * torch.randn(6, 2)
    return Batch({**batch.data, "image": image, "audio": audio}, batch.present, batch.ids, batch.padding)


def test_multimae_masks_the_ratio_and_never_shows_masked_content() -> None:
    method = build(MULTIMAE)
    batch = make_batch(absent={"image": [2], "audio": [4]})
    torch.manual_seed(5)
    out = method(batch)
    extras = out.extras
    for m in ("image", "audio"):
        mask, valid = extras[f"multimae/{m}/mask"], stem_valid(method, batch, m)
        assert not (mask & ~valid).any()
        assert [int(v) for v in mask.sum(1)] == [expected_count(int(n), 0.5) for n in valid.sum(1)]
        assert torch.equal(extras[f"multimae/{m}/row"], mask.nonzero()[:, 0])
    perturbed = perturb_masked(batch, extras["multimae/image/mask"], extras["multimae/audio/mask"])
    torch.manual_seed(5)
    again = method(perturbed).extras
    for m in ("image", "audio"):
        torch.testing.assert_close(again[f"multimae/{m}/pred"], extras[f"multimae/{m}/pred"])
        assert not torch.allclose(again[f"multimae/{m}/target"], extras[f"multimae/{m}/target"])


def test_dirichlet_ratios_share_the_visible_budget() -> None:
    torch.manual_seed(0)
    r = dirichlet_ratios(torch.tensor([0.75, 0.75]), 4000, 1.0)
    torch.testing.assert_close((1 - r).sum(1), torch.full((4000,), 0.5))  # no clipping below a budget of 1
    torch.testing.assert_close(r.mean(0), torch.tensor([0.75, 0.75]), atol=0.01, rtol=0)
    assert r.min() < 0.52 and r.max() > 0.98  # some rows keep almost nothing of one modality
    flat = dirichlet_ratios(torch.tensor([0.6, 0.8]), 100, 1e5)
    torch.testing.assert_close(flat, torch.tensor([[0.6, 0.8]]).expand(100, 2), atol=0.01, rtol=0)


def test_multimae_with_alpha_masks_each_row_by_its_drawn_ratio() -> None:
    method = build({**MULTIMAE, "alpha": 1.0})
    batch = make_batch(absent={"audio": [4]})
    torch.manual_seed(9)
    ratios = dirichlet_ratios(torch.tensor([0.5, 0.5]), 6, 1.0)  # the first draw of features()
    torch.manual_seed(9)
    extras = method(batch).extras
    for i, m in enumerate(("audio", "image")):  # the objective's modalities, in the model's order
        valid = stem_valid(method, batch, m)
        want = [expected_count(int(n), float(r)) for n, r in zip(valid.sum(1), ratios[:, i], strict=True)]
        assert [int(v) for v in extras[f"multimae/{m}/mask"].sum(1)] == want


def test_multimae_loss_is_the_sum_of_per_modality_losses_and_trains_every_part() -> None:
    method = build(MULTIMAE)
    batch = make_batch()
    out = method(batch)
    loss = method.loss(out, batch)
    parts = []
    for m in ("audio", "image"):
        e = {k.split("/")[-1]: v for k, v in out.extras.items() if k.startswith(f"multimae/{m}/")}
        target = e["target"]
        assert target.shape == e["pred"].shape == (e["row"].shape[0], 12 if m == "audio" else 16)
        parts.append(masked_regression_loss(e["pred"], target, e["row"], normalize_target=True))
        torch.testing.assert_close(loss.parts[f"multimae/{m}"], parts[-1])
    torch.testing.assert_close(loss.loss, parts[0] + parts[1])
    loss.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None and ".heads." not in n]
    assert missing == [] or all(n.startswith("model.heads.") for n in missing), missing


def test_multimae_predicts_token_ids_with_cross_entropy() -> None:
    method = build(MULTIMAE, ("image", "text"))
    batch = make_batch()
    out = method(batch)
    loss = method.loss(out, batch)
    pred, target, rows = (out.extras[f"multimae/text/{k}"] for k in ("pred", "target", "row"))
    assert pred.shape[1] == VOCAB and not target.is_floating_point()
    torch.testing.assert_close(loss.parts["multimae/text"], masked_token_loss(pred, target, rows))
    assert 0.0 <= loss.metrics["multimae/acc_text"] <= 1.0


def test_multimae_bind_names_the_encoder_without_token_stem() -> None:
    cnn = {"name": "image_cnn", "widths": [4], "dim": 8}
    with pytest.raises(ConfigError, match=r"method\.modalities: multimae: the 'image' encoder: image_cnn has no token"):
        build({"name": "multimae"}, image=cnn)


def test_modality_absent_from_the_batch_gives_a_connected_zero() -> None:
    method = build(MULTIMAE)
    batch = make_batch(absent={"image": list(range(6)), "audio": list(range(6))})
    out = method(batch)
    loss = method.loss(out, batch).loss
    assert loss.item() == 0.0 and loss.requires_grad


# ---------------------------------------------------------------------------------------------
# Masked modelling with a context


def mlm(**args) -> dict:
    return {"name": "mlm", "fusion_heads": 2, "fusion_depth": 1, "mask_ratio": 0.3, **args}


def test_mlm_preset_is_masked_conditional_plus_infonce() -> None:
    specs = expand_method(mlm(contrastive_weight=0.5))
    assert [(s.name, s.label, s.weight) for s in specs] == [
        ("masked_conditional", "mlm", 1.0),
        ("infonce", "infonce", 0.5),
    ]
    assert specs[1].kwargs["modalities"] == ["image", "text"]
    assert [s.name for s in expand_method(mlm(contrastive_weight=0.0))] == ["masked_conditional"]
    method = build(mlm(), ("image", "text"))
    assert isinstance(method.objectives["mlm"], MaskedConditional)
    batch = make_batch()
    out = method.loss(method(batch), batch)
    assert set(out.parts) == {"mlm", "infonce"}


def test_mlm_masks_regular_tokens_only_on_paired_rows_and_reads_the_context() -> None:
    method = build(mlm(mask_prob=1.0, random_prob=0.0, contrastive_weight=0.0), ("image", "text"))
    batch = make_batch(absent={"image": [1]})
    torch.manual_seed(3)
    extras = method(batch).extras
    mask, text = extras["mlm/text/mask"], batch.data["text"]
    maskable = (text >= 3) & (text < VOCAB - 3) & batch.rows("image")[:, None]
    assert not (mask & ~maskable).any() and not mask[1].any()
    assert [int(v) for v in mask.sum(1)] == [expected_count(int(n), 0.3) for n in maskable.sum(1)]
    assert torch.equal(extras["mlm/text/target"], text[mask])
    # every masked id became [MASK]: other ids there change nothing; another image changes the prediction
    changed = text.clone()
    changed[mask] = 3 + (changed[mask] - 2) % (VOCAB - 6)
    torch.manual_seed(3)
    same = method(Batch({**batch.data, "text": changed}, batch.present, batch.ids, batch.padding)).extras
    torch.testing.assert_close(same["mlm/text/pred"], extras["mlm/text/pred"])
    torch.manual_seed(3)
    other = method(Batch({**batch.data, "image": -batch.data["image"]}, batch.present, batch.ids, batch.padding))
    assert not torch.allclose(other.extras["mlm/text/pred"], extras["mlm/text/pred"])


def test_masked_frames_with_image_context_regress_normalised_frames() -> None:
    method = build({"name": "composite", "objectives": [{"name": "masked_conditional", "target": "audio",
                    "context": "image", "fusion_heads": 2, "mask_ratio": 0.5}]})  # fmt: skip
    batch = make_batch()
    torch.manual_seed(4)
    out = method(batch)
    e = {k.split("/")[-1]: v for k, v in out.extras.items()}
    loss = method.loss(out, batch)
    torch.testing.assert_close(loss.loss, masked_regression_loss(e["pred"], e["target"], e["row"], True))
    perturbed = perturb_masked(batch, torch.zeros(6, 4, dtype=torch.bool), e["mask"])
    torch.manual_seed(4)
    again = method(perturbed).extras
    torch.testing.assert_close(again["masked_conditional/audio/pred"], e["pred"])
    loss.loss.backward()
    objective = method.objectives["masked_conditional"]
    assert all(p.grad is not None for p in objective.parameters())
    assert method.model.encoders["image"].pos.grad is not None  # the context encoder is trained through the fusion


def test_masked_conditional_bind_errors() -> None:
    tdnn = {"name": "audio_tdnn", "widths": [8], "dim": 8}
    entry = {"name": "masked_conditional", "target": "audio", "context": "image"}
    with pytest.raises(ConfigError, match=r"objectives\.0\.modalities: .*audio_tdnn has no token stem"):
        build({"name": "composite", "objectives": [entry]}, audio=tdnn)
    with pytest.raises(ConfigError, match="two distinct modalities"):
        build({"name": "composite", "objectives": [{**entry, "context": "audio"}]})


# ---------------------------------------------------------------------------------------------
# data2vec


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


# ---------------------------------------------------------------------------------------------
# End to end


def test_mlm_learns_a_word_only_the_image_tells() -> None:
    """Text [CLS] w_c f: the class word w_c is predictable from the image only; chance is 1/4."""
    method = build(mlm(contrastive_weight=0.0, mask_ratio=0.5), ("image", "text"))
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 1, 8, 8, generator=g)

    def batch_of(n: int) -> tuple[Batch, Tensor]:
        c = torch.randint(0, 4, (n,), generator=g)
        image = templates[c] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
        text = torch.stack([torch.full((n,), 2), 3 + c, torch.full((n,), 20)], dim=1)
        ones = torch.ones(n, dtype=torch.bool)
        return Batch({"image": image, "text": text}, {"image": ones, "text": ones}, torch.arange(n)), c

    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(80):
        batch, _ = batch_of(32)
        opt.zero_grad()
        method.loss(method(batch), batch).loss.backward()
        opt.step()
    method.eval()
    batch, _ = batch_of(256)
    with torch.no_grad():
        e = method(batch).extras
    is_word = e["mlm/text/target"] < 20
    accuracy = (e["mlm/text/pred"].argmax(1) == e["mlm/text/target"])[is_word].float().mean().item()
    assert accuracy > 0.8, accuracy


@pytest.mark.slow
def test_multimae_cli_run_probes_above_chance(data_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from modalign.cli.main import app

    run = tmp_path / "run"
    args = ["train", "av-digits-multimae", "train.epochs=1", "data.test_size=500", "eval.plots=false",
            "model.encoders.image.depth=1", "model.encoders.audio.depth=1", "method.decoder_depth=1",
            "--run-dir", str(run), "--data-root", str(data_root)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval.json").read_text())
    # chance is 0.1 for 10 digits
    assert metrics["audio/linear_probe"] > 0.5 and metrics["image/linear_probe"] > 0.3, metrics
    assert any(k.startswith("loss/multimae/") for k in (run / "metrics.jsonl").read_text().splitlines()[0].split('"'))
