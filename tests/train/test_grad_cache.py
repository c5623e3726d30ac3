"""Gradient caching equals the plain full-batch step: loss and every parameter gradient."""

from __future__ import annotations

import pytest
import torch

from modalign.core import Batch, ConfigError, ModalitySpec
from modalign.core.types import Outputs
from modalign.methods import Method
from modalign.train.build import build_method
from modalign.train.grad_cache import batch_rows, check_cacheable, grad_cache_backward, merge_outputs
from modalign.train.recipe import validate_recipe

VOCAB = 40
SPECS = {
    "image": ModalitySpec("image", channels=1, size=8),
    "audio": ModalitySpec("audio", channels=6),
    "text": ModalitySpec("text", vocab_size=VOCAB),
}
ENCODERS = {
    "image": {"name": "image_vit", "patch": 4, "dim": 16, "depth": 1, "heads": 2},
    "audio": {"name": "audio_transformer", "patch": 2, "dim": 16, "depth": 1, "heads": 2},
    "text": {"name": "text_transformer", "dim": 16, "depth": 1, "heads": 2, "max_len": 8},
}
N = 8
# Methods whose objectives read Outputs only; several modalities, ids and clustering tables.
METHODS = {
    "clip": {"name": "clip", "temperature": 0.1, "modalities": ["image", "text"]},
    "siglip": {"name": "siglip", "modalities": ["audio", "text"]},
    "multiview": {"name": "cmc"},
    "vicreg+infonce": {
        "name": "composite",
        "objectives": [
            {"name": "vicreg", "weight": 0.5, "modalities": ["image", "audio"]},
            {"name": "infonce", "modalities": ["audio", "text"]},
        ],
    },
    "barlow": {"name": "barlow", "modalities": ["audio", "text"]},
    "dcl": {"name": "dcl", "modalities": ["image", "text"]},
    # Feature-neighbour positives read the encoders' pooled features from the merged chunk outputs.
    "infonce+neighbours": {
        "name": "composite",
        "objectives": [
            {"name": "infonce", "modalities": ["image", "text"]},
            {"name": "unimodal_infonce", "modalities": ["image", "audio"], "neighbours": 2, "dim": 4},
        ],
    },
}


def build(method: dict, head: dict | None = None, seed: int = 0) -> Method:
    tree = {
        "data": {"name": "av-digits"},
        "model": {"embed_dim": 8, "encoders": ENCODERS, "head": head or {"name": "linear"}},
        "method": method,
    }
    torch.manual_seed(seed)
    return build_method(validate_recipe(tree), SPECS).double()  # float64: summation order does not show


def make_batch(absent_text: list[int] | None = None, repeat_ids: bool = True) -> Batch:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([10, 7, 10, 4, 9, 2, 10, 5])
    text = torch.randint(3, VOCAB - 3, (N, 7), generator=g)
    text[:, 0] = 2
    text[torch.arange(7)[None] >= torch.tensor([7, 3, 5, 2, 7, 4, 6, 1])[:, None]] = 0
    present = {m: torch.ones(N, dtype=torch.bool) for m in SPECS}
    present["text"][absent_text or []] = False
    ids = torch.tensor([0, 1, 2, 3, 1, 5, 6, 7]) if repeat_ids else torch.arange(N)
    return Batch(
        data={
            "image": torch.randn(N, 1, 8, 8, generator=g, dtype=torch.float64),
            "audio": torch.randn(N, 6, 10, generator=g, dtype=torch.float64),
            "text": text,
        },
        present=present,
        ids=ids,
        padding={"audio": torch.arange(10)[None] >= lengths[:, None], "text": text == 0},
    )


def grads(method: Method) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def assert_same_step(want_loss: torch.Tensor, want: dict[str, torch.Tensor], got_loss: torch.Tensor, got: dict) -> None:
    torch.testing.assert_close(got_loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-10)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("chunk", [3, 8])
@pytest.mark.parametrize("kind", sorted(METHODS))
def test_equals_full_batch_step(kind: str, chunk: int) -> None:
    """Chunks of 3, 3, 2 rows (text absent from every row of the second) give the full step's gradients."""
    batch = make_batch(absent_text=[3, 4, 5])
    method = build(METHODS[kind])
    method.train()
    full = method.loss(method(batch), batch)
    full.loss.backward()
    want = grads(method)
    method.zero_grad(set_to_none=True)
    got = grad_cache_backward(method, batch, chunk)
    assert_same_step(full.loss, want, got.loss, grads(method))
    assert got.parts.keys() == full.parts.keys()


def test_replays_each_chunks_dropout_masks() -> None:
    """With dropout, the replay reuses phase 1's masks: equal to chunked forwards kept with their graphs."""
    batch = make_batch()
    method = build(METHODS["clip"], head={"name": "mlp", "hidden": 32, "dropout": 0.5})
    method.train()
    torch.manual_seed(5)
    slices = [slice(0, 3), slice(3, 6), slice(6, 8)]
    chunks = [method.model(batch_rows(batch, s)) for s in slices]
    ref = method.loss(merge_outputs(chunks, [3, 3, 2]), batch)
    ref.loss.backward()
    want = grads(method)
    state_after_ref = torch.get_rng_state()
    method.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    got = grad_cache_backward(method, batch, 3)
    assert_same_step(ref.loss, want, got.loss, grads(method))
    assert torch.equal(torch.get_rng_state(), state_after_ref)  # the RNG moves on as one pass would
    # and the masks matter: another seed gives another loss
    method.zero_grad(set_to_none=True)
    torch.manual_seed(6)
    assert not torch.allclose(grad_cache_backward(method, batch, 3).loss, ref.loss)


def test_merge_pads_ragged_tokens_and_absent_chunks() -> None:
    a = Outputs(embeddings={"x": torch.ones(2, 3)}, tokens={"x": torch.ones(2, 4, 5)})
    pad = {"x": torch.tensor([[False, True]])}
    b = Outputs(embeddings={"x": torch.ones(1, 3)}, tokens={"x": torch.ones(1, 2, 5)}, padding=pad)
    c = Outputs(embeddings={})
    out = merge_outputs([a, b, c], [2, 1, 2])
    assert out.embeddings["x"].shape == (5, 3) and out.embeddings["x"][3:].abs().sum() == 0
    assert out.tokens["x"].shape == (5, 4, 5)
    want = torch.tensor([[False] * 4, [False] * 4, [False, True, True, True], [True] * 4, [True] * 4])
    assert torch.equal(out.padding["x"], want)
    with pytest.raises(ValueError, match="extras"):
        merge_outputs([Outputs(embeddings={}, extras={"k": torch.ones(1)})], [1])


def test_refuses_objectives_that_run_the_model() -> None:
    method = build({"name": "moco", "modalities": ["image", "audio"]})
    with pytest.raises(ConfigError, match=r"train\.grad_cache: objective 'moco'.*Objective\.features"):
        check_cacheable(method)
    check_cacheable(build(METHODS["clip"]))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        grad_cache_backward(build(METHODS["clip"]), make_batch(), 0)
