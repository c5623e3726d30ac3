"""Masked prediction: the losses, the masking helpers, MultiMAE, masked modelling with a context.

Reference tests of the losses (NumPy float64 and explicit loops, value and gradient), masking
properties (exact ratio per row, masked content never reaches the trunk), bind errors, and tiny
end-to-end runs. data2vec (teacher, EMA, resume) is tested in ``test_data2vec.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.methods import Method
from modalign.objectives import (
    MaskedConditional,
    masked_regression_loss,
    masked_token_loss,
    random_mask,
)
from modalign.objectives.masked import bert_corrupt, dirichlet_ratios, per_row_mean, visible_index
from modalign.train.build import build_method
from modalign.train.recipe import expand_method, validate_recipe
from support.masked import expected_count, perturb_masked, stem_valid

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
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


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


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), span=st.integers(2, 6), ratio=st.floats(0.05, 0.95))
def test_span_mask_keeps_the_count_and_masks_contiguous_runs(seed: int, span: int, ratio: float) -> None:
    torch.manual_seed(seed)
    lengths = torch.tensor([0, 1, 2, 7, 30, 31])
    valid = torch.arange(31)[None] < lengths[:, None]
    mask = random_mask(valid, ratio, span=span)
    assert not bool((mask & ~valid).any())
    for row, n in enumerate(lengths.tolist()):
        k = int(mask[row].sum())
        assert k == expected_count(n, ratio)
        if k == 0:
            continue
        # Runs of masked positions: at most one per touched block, and every touched block is
        # whole except the row's first block (cut by the random offset), the block cut by the
        # end of the valid positions and the last one chosen (partly masked): at most three
        # short blocks, so at most ceil(k / span) + 3 runs (uniform masking gives about k/2).
        edges = torch.diff(torch.cat([torch.zeros(1), mask[row, :n].float(), torch.zeros(1)]))
        runs = int((edges == 1).sum())
        assert runs <= math.ceil(k / span) + 3, (mask[row, :n].int().tolist(), span)


def test_span_mask_is_uniform_over_positions_and_bad_span_raises() -> None:
    torch.manual_seed(0)
    valid = torch.ones(4000, 20, dtype=torch.bool)
    freq = random_mask(valid, 0.5, span=4).float().mean(dim=0)
    assert float((freq - 0.5).abs().max()) < 0.05, freq
    with pytest.raises(ValueError, match="span"):
        random_mask(valid, 0.5, span=0)
