"""Matching objectives: ITM with hard negatives (ALBEF/BLIP) and audio-visual correspondence (L3-Net).

References are NumPy float64 formulas and explicit loops; the samplers are checked against their
distributions with chi-square tests over many draws.
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
from scipy.stats import chisquare
from torch import Tensor, nn

from modalign.core import Batch, ConfigError, ModalitySpec, Outputs
from modalign.objectives import AudioVisualCorrespondence, ImageTextMatching, InfoNCE, avc_loss, itm_loss
from modalign.objectives.matching import matching_pairs, sample_hard_negatives, shuffled_partners
from modalign.train.build import build_method
from modalign.train.recipe import expand_method, validate_recipe

# ---------------------------------------------------------------- sample_hard_negatives


def np_masked_softmax(sim: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the allowed columns (float64), zero on the same-content ones."""
    out = np.zeros_like(sim)
    for i in range(sim.shape[0]):
        allowed = ~same[i]
        e = np.exp(sim[i, allowed] - sim[i, allowed].max())
        out[i, allowed] = e / e.sum()
    return out


def test_hard_negative_frequencies_match_the_masked_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(3, 6, generator=g, dtype=torch.float64) * 1.5
    same = torch.zeros(3, 6, dtype=torch.bool)
    same[0, 0] = True
    same[1, [1, 3]] = True
    same[2, :5] = True  # only column 5 is allowed
    draws = 6000
    got = sample_hard_negatives(sim.repeat(draws, 1), same.repeat(draws, 1), torch.Generator().manual_seed(1))
    want = np_masked_softmax(sim.numpy(), same.numpy())
    for i in range(3):
        counts = np.bincount(got[i::3].numpy(), minlength=6)
        allowed = ~same[i].numpy()
        assert counts[~allowed].sum() == 0  # never a same-content column
        if allowed.sum() > 1:
            assert chisquare(counts[allowed], draws * want[i, allowed]).pvalue > 1e-4
        else:
            assert counts[allowed].sum() == draws


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 7), m=st.integers(1, 7), p=st.floats(0.0, 1.0))
def test_hard_negatives_never_same_content_and_minus_one_without_candidate(seed: int, n: int, m: int, p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n, m, generator=g) * 5
    same = torch.rand(n, m, generator=g) < p
    out = sample_hard_negatives(sim, same, g)
    assert out.shape == (n,) and out.dtype == torch.long
    for i in range(n):
        if bool(same[i].all()):
            assert out[i] == -1
        else:
            assert 0 <= out[i] < m and not bool(same[i, out[i]])


def test_hard_negatives_are_reproducible_with_a_generator_and_peak_at_the_hardest() -> None:
    sim = torch.tensor([[0.0, 50.0, 1.0], [3.0, 0.0, 40.0]])
    same = torch.tensor([[True, False, False], [False, True, False]])
    a = sample_hard_negatives(sim, same, torch.Generator().manual_seed(5))
    b = sample_hard_negatives(sim, same, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("sim", "same", "match"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.bool), r"sim must be \[N, M\]"),
        (torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool), r"same must be a bool tensor of shape \(2, 3\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3), r"same must be a bool tensor"),
    ],
)
def test_hard_negative_bad_inputs_raise(sim: Tensor, same: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_hard_negatives(sim, same)


# ---------------------------------------------------------------- shuffled_partners


def random_same(n: int, groups: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(1, groups), (n,), generator=g)
    return ids[:, None] == ids[None, :]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 12), groups=st.integers(1, 12))
def test_partners_are_one_to_one_and_never_same_content(seed: int, n: int, groups: int) -> None:
    same = random_same(n, groups, seed)
    partner = shuffled_partners(same, torch.Generator().manual_seed(seed))
    kept = partner[partner >= 0]
    assert kept.unique().numel() == kept.numel()  # each b row at most once among the negatives
    for i in range(n):
        if partner[i] >= 0:
            assert partner[i] != i and not bool(same[i, partner[i]])


def test_partners_are_uniform_over_the_other_rows() -> None:
    n, draws = 5, 4000
    g = torch.Generator().manual_seed(0)
    same = torch.eye(n, dtype=torch.bool)
    counts = np.zeros((n, n))
    for _ in range(draws):
        partner = shuffled_partners(same, g)
        counts[np.arange(n), partner.numpy()] += 1
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    for row in off:
        assert chisquare(row, np.full(n - 1, draws / (n - 1))).pvalue > 1e-4


def test_partners_repair_duplicates_and_give_up_only_when_impossible() -> None:
    ids = torch.tensor([0, 0, 0, 1, 2, 3])  # three copies of one content
    same = ids[:, None] == ids[None, :]
    for seed in range(50):
        partner = shuffled_partners(same, torch.Generator().manual_seed(seed))
        assert bool((partner >= 0).all())  # a valid derangement exists and is found
        assert not bool(same[torch.arange(6), partner].any())
    assert shuffled_partners(torch.ones(4, 4, dtype=torch.bool)).tolist() == [-1] * 4
    assert shuffled_partners(torch.zeros(1, 1, dtype=torch.bool)).tolist() == [-1]
    assert shuffled_partners(torch.zeros(2, 2, dtype=torch.bool)).tolist() == [1, 0]


def test_partners_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="square bool"):
        shuffled_partners(torch.zeros(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------- matching_pairs


def test_matching_pairs_lists_positives_then_both_negatives() -> None:
    anchors = torch.tensor([3, 4, 5])
    neg_b, neg_a = torch.tensor([0, -1, 7]), torch.tensor([6, 1, -1])
    index_a, index_b, labels = matching_pairs(anchors, neg_b, neg_a)
    want = [(3, 3, 1), (4, 4, 1), (5, 5, 1), (3, 0, 0), (5, 7, 0), (6, 3, 0), (1, 4, 0)]
    assert list(zip(index_a.tolist(), index_b.tolist(), labels.tolist(), strict=True)) == want
    with pytest.raises(ValueError, match=r"must be \[n\]"):
        matching_pairs(anchors, neg_b[:2], neg_a)


# ---------------------------------------------------------------- itm_loss / avc_loss

LOSSES = [itm_loss, avc_loss]


def np_pair_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        total += math.log(math.exp(row[0]) + math.exp(row[1])) - row[y]
    return total / len(labels)


def loop_pair_ce(logits: Tensor, labels: list[int]) -> Tensor:
    terms = [torch.logsumexp(logits[p], dim=0) - logits[p, y] for p, y in enumerate(labels)]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("fn", LOSSES)
def test_loss_value_and_gradient_match_references(fn: object) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 2, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.tensor([1, 0, 0, 1, 0, 0, 1])
    loss = fn(logits, labels)  # type: ignore[operator]
    assert loss.item() == pytest.approx(np_pair_ce(logits.detach().numpy(), labels.numpy()), rel=1e-12)
    got = torch.autograd.grad(loss, logits)[0]
    want = torch.autograd.grad(loop_pair_ce(logits, labels.tolist()), logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: fn(x, labels), (logits,))  # type: ignore[operator]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9))
def test_loss_is_permutation_invariant_and_bounded_by_confidence(seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(itm_loss(logits[perm], labels[perm]), itm_loss(logits, labels))
    assert itm_loss(torch.zeros(n, 2, dtype=torch.float64), labels).item() == pytest.approx(math.log(2))
    confident = F.one_hot(labels, 2).double() * 60.0
    assert 0.0 <= itm_loss(confident, labels).item() < 1e-20


def test_loss_gather_without_process_group_is_local() -> None:
    logits, labels = torch.randn(4, 2), torch.tensor([1, 0, 0, 1])
    torch.testing.assert_close(itm_loss(logits, labels, gather=True), itm_loss(logits, labels))


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), r"logits must be \[P, 2\]"),
        (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), r"labels must be a LongTensor \[3\]"),
        (torch.zeros(3, 2), torch.zeros(3), r"labels must be a LongTensor"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "empty batch"),
    ],
)
def test_loss_bad_inputs_raise(logits: Tensor, labels: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        itm_loss(logits, labels)


# ---------------------------------------------------------------- modules on hand-made outputs


class _Width(nn.Module):
    def __init__(self, **attrs: int) -> None:
        super().__init__()
        for k, v in attrs.items():
            setattr(self, k, v)


class StubModel(nn.Module):
    """What ``bind`` reads: ``modalities``, encoder token widths and projection head widths."""

    def __init__(self, dims: dict[str, int], out_dim: int = 6) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: _Width(dim=d) for m, d in dims.items()})
        self.heads = nn.ModuleDict({m: _Width(out_dim=out_dim) for m in dims})

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted(self.encoders))


DIMS = {"text": 8, "image": 12}


def hand_outputs(n: int, seed: int, emb: dict[str, Tensor] | None = None) -> Outputs:
    """Text tokens ``[n, 5, 8]`` with ragged padding, image tokens ``[n, 4, 12]`` without, embeddings."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=g)
    proj = {m: torch.randn(n, 6, generator=g, dtype=torch.float64) for m in DIMS}
    embeddings = emb if emb is not None else {m: F.normalize(p, dim=-1) for m, p in proj.items()}
    return Outputs(
        embeddings={m: e.clone().requires_grad_() for m, e in embeddings.items()},
        projections={m: p.requires_grad_() for m, p in proj.items()},
        tokens={
            "text": torch.randn(n, 5, 8, generator=g, dtype=torch.float64).requires_grad_(),
            "image": torch.randn(n, 4, 12, generator=g, dtype=torch.float64).requires_grad_(),
        },
        padding={"text": torch.arange(5)[None, :] >= lengths[:, None]},
    )


def hand_batch(n: int, ids: list[int] | None = None, image_ids: list[int] | None = None) -> Batch:
    ids_t = torch.tensor(ids) if ids is not None else torch.arange(n)
    return Batch(
        data={"text": torch.zeros(n, 5, dtype=torch.long), "image": torch.zeros(n, 1)},
        present={"text": torch.ones(n, dtype=torch.bool), "image": torch.ones(n, dtype=torch.bool)},
        ids=ids_t,
        modality_ids={"image": torch.tensor(image_ids)} if image_ids is not None else {},
    )


def bound_itm(**kwargs: object) -> ImageTextMatching:
    torch.manual_seed(0)
    obj = ImageTextMatching(modalities=["text", "image"], heads=2, **kwargs)  # type: ignore[arg-type]
    obj.label = "itm"
    obj.bind(StubModel(DIMS))
    return obj.double()


def run(obj: nn.Module, outputs: Outputs, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
    extras = obj.features(None, batch, outputs)  # type: ignore[operator]
    outputs.extras.update({obj.key(k): v for k, v in extras.items()})  # type: ignore[operator]
    return extras, obj(outputs, batch).loss


def test_itm_fuses_three_pairs_per_row_with_valid_negatives() -> None:
    n, ids, image_ids = 7, [0, 1, 2, 3, 4, 5, 1], [10, 11, 12, 13, 14, 12, 16]
    obj, outputs, batch = bound_itm(), hand_outputs(n, 0), hand_batch(n, ids, image_ids)
    extras, loss = run(obj, outputs, batch)
    ia, ib, labels = extras["index_a"], extras["index_b"], extras["labels"]
    assert labels.tolist() == [1] * n + [0] * (2 * n)
    assert ia[:n].tolist() == ib[:n].tolist() == list(range(n))
    for a, b in zip(ia[n:].tolist(), ib[n:].tolist(), strict=True):
        # a negative pairs two rows holding different text AND different image content
        assert ids[a] != ids[b] and image_ids[a] != image_ids[b]
    tok, pad = outputs.tokens, outputs.padding["text"]
    no_pad = torch.zeros(n, 4, dtype=torch.bool)
    assert obj.head is not None
    want = obj.head(tok["text"][ia], pad[ia], tok["image"][ib], no_pad[ib])
    torch.testing.assert_close(extras["logits"], want)
    torch.testing.assert_close(loss, itm_loss(want, labels))


def test_itm_gradients_reach_head_and_both_tokens_but_not_the_embeddings() -> None:
    obj, outputs = bound_itm(), hand_outputs(6, 1)
    _, loss = run(obj, outputs, hand_batch(6))
    tensors = [outputs.tokens["text"], outputs.tokens["image"], *outputs.embeddings.values()]
    grads = torch.autograd.grad(loss, [*tensors, *obj.parameters()], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is not None and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None  # sampling is detached
    assert all(g is not None and g.abs().sum() > 0 for g in grads[4:])


def test_itm_draws_the_hardest_negative_when_the_temperature_is_low() -> None:
    n = 6
    basis = torch.eye(n, dtype=torch.float64)
    emb = {"text": basis, "image": basis.roll(1, dims=0)}  # image row j is the basis vector j - 1
    hard = bound_itm(temperature=1e-3)
    extras, _ = run(hard, hand_outputs(n, 2, emb), hand_batch(n))
    neg_b = extras["index_b"][n : 2 * n]
    neg_a = extras["index_a"][2 * n :]
    # text_i . image_j = [j - 1 == i]: text i's hardest image is i + 1, image j's hardest text j - 1
    assert neg_b.tolist() == [(i + 1) % n for i in range(n)]
    assert neg_a.tolist() == [(j - 1) % n for j in range(n)]
    uniform = bound_itm(temperature=1e-3, hard_negatives=False)
    torch.manual_seed(0)
    drawn = {tuple(run(uniform, hand_outputs(n, 2, emb), hand_batch(n))[0]["index_b"].tolist()) for _ in range(5)}
    assert len(drawn) > 1  # uniform draws ignore the similarity


def test_itm_max_rows_fuses_a_random_subset() -> None:
    obj = bound_itm(max_rows=3)
    extras, _ = run(obj, hand_outputs(8, 3), hand_batch(8))
    anchors = extras["index_a"][:3]
    assert extras["logits"].shape == (9, 2) and anchors.unique().numel() == 3
    assert extras["labels"].tolist() == [1] * 3 + [0] * 6


@pytest.mark.parametrize("paired", [0, 1])
def test_itm_with_too_few_pairs_stays_connected(paired: int) -> None:
    n = 3
    obj, outputs, batch = bound_itm(), hand_outputs(n, 4), hand_batch(n)
    batch.present["image"] = torch.arange(n) < paired
    out_extras, loss = run(obj, outputs, batch)
    assert out_extras["logits"].shape == (paired, 2)  # one row has no negative candidate
    loss.backward()
    assert obj.head is not None and obj.head.classifier.weight.grad is not None
    if paired == 0:
        assert loss.item() == 0.0


def test_itm_with_a_modality_absent_gives_connected_zero() -> None:
    obj, outputs = bound_itm(), hand_outputs(3, 5)
    del outputs.tokens["image"], outputs.embeddings["image"]
    extras, loss = run(obj, outputs, hand_batch(3))
    assert extras == {} and loss.item() == 0.0
    loss.backward()
    assert outputs.embeddings["text"].grad is not None


def test_itm_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        ImageTextMatching(temperature=0.0)
    with pytest.raises(ConfigError, match="max_rows: must be > 0"):
        ImageTextMatching(max_rows=0)
    with pytest.raises(ConfigError, match="heads: must divide the fusion width 8"):
        ImageTextMatching(modalities=["text", "image"], heads=3).bind(StubModel(DIMS))
    with pytest.raises(ConfigError, match="no encoder"):
        ImageTextMatching(modalities=["text", "audio"]).bind(StubModel(DIMS))
    with pytest.raises(ValueError, match="bind"):
        ImageTextMatching().features(None, hand_batch(2), hand_outputs(2, 0))  # type: ignore[arg-type]


def bound_avc(head: str = "concat") -> AudioVisualCorrespondence:
    torch.manual_seed(0)
    obj = AudioVisualCorrespondence(modalities=["text", "image"], head=head, hidden=5)  # type: ignore[arg-type]
    obj.label = "avc"
    obj.bind(StubModel(DIMS))
    return obj.double()


@pytest.mark.parametrize("head", ["concat", "distance"])
def test_avc_classifies_true_against_shuffled_pairs(head: str) -> None:
    n, ids, image_ids = 6, [0, 1, 2, 3, 4, 5], [7, 7, 8, 9, 10, 11]
    obj, outputs, batch = bound_avc(head), hand_outputs(n, 6), hand_batch(n, ids, image_ids)
    extras, loss = run(obj, outputs, batch)
    ia, ib, labels = extras["index_a"], extras["index_b"], extras["labels"]
    assert labels.tolist() == [1] * n + [0] * n
    assert ia.tolist() == list(range(n)) * 2 and ib[:n].tolist() == list(range(n))
    assert sorted(ib[n:].tolist()) == list(range(n))  # a derangement: each b once among the negatives
    assert all(image_ids[a] != image_ids[b] for a, b in zip(ia[n:].tolist(), ib[n:].tolist(), strict=True))
    vec = outputs.projections if head == "concat" else outputs.embeddings
    a, b = vec["text"][ia], vec["image"][ib]
    assert obj.head is not None
    net = obj.head.net
    want = net(torch.cat([a, b], dim=1)) if head == "concat" else net((a - b).norm(dim=1, keepdim=True))
    torch.testing.assert_close(extras["logits"], want)
    torch.testing.assert_close(loss, avc_loss(want, labels))
    grads = torch.autograd.grad(loss, [vec["text"], vec["image"], *obj.parameters()])
    assert all(g.abs().sum() > 0 for g in grads)


def test_avc_distance_head_starts_with_a_threshold_at_distance_one() -> None:
    head = bound_avc("distance").head
    assert head is not None
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    logits = head(a, b)
    d = torch.tensor([0.0, math.sqrt(2.0), 2.0], dtype=torch.float64)
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], 10.0 * (1.0 - d))


def test_avc_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="hidden: must be > 0"):
        AudioVisualCorrespondence(hidden=0)
    model = StubModel(DIMS)
    del model.heads["image"].out_dim
    with pytest.raises(ConfigError, match="no integer width 'out_dim'"):
        AudioVisualCorrespondence().bind(model)
    AudioVisualCorrespondence(head="distance").bind(model)  # reads no widths


# ---------------------------------------------------------------- presets, recipes, end to end


def test_presets_expand_to_their_objectives() -> None:
    specs = expand_method({"name": "itm", "modalities": ["text", "image"], "itm_weight": 0.5, "max_rows": 16})
    assert [(s.name, s.weight) for s in specs] == [("infonce", 1.0), ("itm", 0.5)]
    assert specs[1].kwargs["modalities"] == ["text", "image"] and specs[1].kwargs["max_rows"] == 16
    assert [s.name for s in expand_method({"name": "avc"})] == ["avc"]
    specs = expand_method({"name": "avc", "contrastive_weight": 0.1, "head": "distance"})
    assert [(s.name, s.weight) for s in specs] == [("avc", 1.0), ("infonce", 0.1)]
    with pytest.raises(ConfigError, match=r"method\.itm_weight: must be >= 0"):
        expand_method({"name": "itm", "itm_weight": -1})
    with pytest.raises(ConfigError, match=r"method\.head"):
        expand_method({"name": "avc", "head": "bilinear"})


SPECS = {"text": ModalitySpec("vector", channels=8), "image": ModalitySpec("vector", channels=8)}
MIXING = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]


def vector_method(method: dict) -> nn.Module:
    torch.manual_seed(0)
    tree = {
        "data": {"name": "av-digits"},
        "model": {
            "embed_dim": 16,
            "encoders": {m: {"name": "vector_mlp", "dim": 16, "hidden": 32} for m in SPECS},
        },
        "method": method,
    }
    return build_method(validate_recipe(tree), SPECS)


def vector_batch(g: torch.Generator, pool: Tensor, n: int = 32) -> Batch:
    """``n`` rows of a fixed pool of contents; ``image = MIXING @ text + noise`` (ids = pool rows)."""
    rows = torch.randperm(pool.shape[0], generator=g)[:n]
    text = pool[rows]
    image = text @ MIXING.T + 0.05 * torch.randn(n, 8, generator=g)
    ones = torch.ones(n, dtype=torch.bool)
    return Batch(data={"text": text, "image": image}, present={"text": ones, "image": ones}, ids=rows)


@pytest.mark.parametrize(
    ("method", "label", "chance"),
    [
        ({"name": "itm", "modalities": ["text", "image"], "heads": 2, "temperature": 0.1}, "itm", 2 / 3),
        ({"name": "avc", "hidden": 32}, "avc", 1 / 2),
    ],
)
def test_matching_head_learns_on_synthetic_pairs(method: dict, label: str, chance: float, one_thread: None) -> None:
    """Trained end to end (``build_method``), the matching head beats the majority-class rate."""
    model = vector_method(method)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(96, 8, generator=g)
    accs = []
    for _ in range(150):
        batch = vector_batch(g, pool)
        out = model.loss(model(batch), batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        accs.append(out.metrics[f"{label}/acc"])
    assert np.mean(accs[:10]) < chance + 0.1
    assert np.mean(accs[-20:]) > chance + 0.15, (np.mean(accs[:10]), np.mean(accs[-20:]))


def test_itm_preset_is_infonce_plus_itm_on_the_same_outputs() -> None:
    model = vector_method({"name": "itm", "modalities": ["text", "image"], "heads": 2, "itm_weight": 0.5})
    assert isinstance(model.objectives["infonce"], InfoNCE)
    assert isinstance(model.objectives["itm"], ImageTextMatching)
    batch = vector_batch(torch.Generator().manual_seed(2), torch.randn(40, 8))
    outputs = model(batch)
    out = model.loss(outputs, batch)
    torch.testing.assert_close(out.loss, out.parts["infonce"] + 0.5 * out.parts["itm"])
    want = itm_loss(outputs.extras["itm/logits"], outputs.extras["itm/labels"])
    torch.testing.assert_close(out.parts["itm"], want)


# ---------------------------------------------------------------- real data (CLI), slow


def _train_cli(args: list[str]) -> None:
    from typer.testing import CliRunner

    from modalign.cli.main import app

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_emoji_itm_recipe_learns_retrieval_and_matching(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train_cli(["emoji-itm", "train.epochs=8", "eval.probe=false", "eval.plots=false", "eval.report=false",
                "--run-dir", str(run), "--data-root", str(data_root)])  # fmt: skip
    metrics = json.loads((run / "eval.json").read_text())
    # 400 held-out emoji: chance for R@10 is 0.025
    assert metrics["image->text/R@10"] > 0.1 and metrics["text->image/R@10"] > 0.1, metrics
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    itm = [(row["itm/acc"], row["loss/itm"]) for row in log if "itm/acc" in row]
    # One true pair per two negatives: always answering "no match" scores 2/3, and the best
    # constant prediction has cross-entropy H(1/3) = 0.6365. The head only starts beating it
    # after the contrastive towers align (step ~50 of 96; 4 epochs left it at exactly 2/3).
    prior = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert itm and itm[-1][0] > 2 / 3 and itm[-1][1] < prior - 0.03, itm


@pytest.mark.slow
def test_av_digits_avc_recipe_gives_probes_far_above_chance(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train_cli(["av-digits-avc", "train.epochs=2", "data.test_size=500", "eval.plots=false", "--run-dir", str(run),
                "--data-root", str(data_root)])  # fmt: skip
    metrics = json.loads((run / "eval.json").read_text())
    # 10 digits: chance is 0.1 for the probes and for class-match p@1
    assert metrics["image/linear_probe"] > 0.6 and metrics["audio/linear_probe"] > 0.6, metrics
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accs = [row["avc/acc"] for row in log if "avc/acc" in row]
    assert accs and accs[-1] > 0.6, accs  # chance 0.5
