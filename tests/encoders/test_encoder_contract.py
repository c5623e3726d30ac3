"""Contract tests over every registered encoder (timm ``tests/test_models.py`` style)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from modalign.core import ConfigError, Encoder, ModalitySpec, available, create, lookup
from modalign.core.config import check_component
from modalign.encoders.pretrained import PretrainedEncoder

B = 4
SPECS: dict[str, list[ModalitySpec]] = {
    "image": [ModalitySpec("image", channels=1, size=28), ModalitySpec("image", channels=3, size=32)],
    "audio": [ModalitySpec("audio", channels=40)],
    "text": [ModalitySpec("text", vocab_size=100)],
    "series": [ModalitySpec("series", channels=3, length=80)],
    "vector": [ModalitySpec("vector", channels=16)],
}
SEQ_LEN = {"audio": 32, "text": 12, "series": 80}
SMALL: dict[str, dict[str, Any]] = {
    "image_cnn": {"widths": [8, 16, 16], "dim": 16},
    "image_vit": {"patch": 4, "dim": 16, "depth": 1, "heads": 2},
    "audio_cnn": {"widths": [8, 16, 16], "dim": 16},
    "audio_transformer": {"patch": 4, "dim": 16, "depth": 1, "heads": 2},
    "text_transformer": {"dim": 16, "depth": 1, "heads": 2, "max_len": 16},
    "text_bow": {"dim": 16, "hidden": 16},
    "series_conv": {"widths": [8, 16], "dim": 16},
    "series_transformer": {"dim": 16, "depth": 1, "heads": 2},
    "vector_mlp": {"dim": 16, "hidden": 32},
}
#: Encoders trained from the data's own tensors; the pretrained towers bring their own inputs
#: and have their contract tests in ``test_stitch.py``.
SCRATCH = [n for n in available("encoder") if not issubclass(lookup("encoder", n), PretrainedEncoder)]
CASES = [
    pytest.param(name, spec, id=f"{name}-{i}")
    for name in SCRATCH
    for i, spec in enumerate(SPECS[lookup("encoder", name).kind])
]
SEQ_CASES = [c for c in CASES if lookup("encoder", str(c.values[0])).kind in SEQ_LEN]


def build(name: str, spec: ModalitySpec) -> Encoder:
    """Validate the small config like a recipe would, then create through the registry."""
    cls = lookup("encoder", name)
    data_kwargs = cls.spec_kwargs(spec)
    recipe = {"name": name, **SMALL.get(name, {})}
    _, kwargs = check_component("encoder", recipe, f"model.encoders.{spec.kind}", frozenset(data_kwargs))
    torch.manual_seed(0)
    enc = create("encoder", name, **data_kwargs, **kwargs)
    assert isinstance(enc, Encoder) and enc.kind == spec.kind
    return enc


def lengths(spec: ModalitySpec) -> list[int]:
    t = SEQ_LEN[spec.kind]
    return [t, t // 3, t // 2 + 1, t]


def make_input(spec: ModalitySpec, seed: int = 0, t: int | None = None) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        assert spec.size is not None
        return torch.randn(B, spec.channels, spec.size, spec.size, generator=g), None
    if spec.kind == "vector":
        return torch.randn(B, spec.channels, generator=g), None
    t = t or SEQ_LEN[spec.kind]
    lens = [min(n, t) for n in lengths(spec)] if t == SEQ_LEN[spec.kind] else [t, max(1, t // 2), t, 1]
    padding = torch.arange(t)[None, :] >= torch.tensor(lens)[:, None]
    if spec.kind == "text":
        assert spec.vocab_size is not None
        ids = torch.randint(1, spec.vocab_size, (B, t), generator=g)
        return ids.masked_fill(padding, 0), padding
    x = torch.randn(B, spec.channels, t, generator=g)
    return x.masked_fill(padding[:, None, :], 0.0), padding


def perturb_padded(x: Tensor, padding: Tensor, spec: ModalitySpec) -> Tensor:
    g = torch.Generator().manual_seed(123)
    if spec.kind == "text":
        assert spec.vocab_size is not None
        noise = torch.randint(1, spec.vocab_size, x.shape, generator=g)
        return torch.where(padding, noise, x)
    noise = 10.0 * torch.randn(x.shape, generator=g)
    return torch.where(padding[:, None, :], noise, x)


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_output_shapes_and_finite(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec)
    x, padding = make_input(spec)
    out = enc(x, padding)
    assert out.pooled.shape == (B, enc.dim)
    assert out.tokens.dim() == 3 and out.tokens.shape[0] == B and out.tokens.shape[2] == enc.dim
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    if spec.kind in SEQ_LEN:
        assert out.padding is not None and out.padding.dtype == torch.bool
        assert out.padding.shape == out.tokens.shape[:2]
    else:
        assert out.padding is None
    if spec.kind == "vector":
        assert out.tokens.shape[1] == 1


@pytest.mark.parametrize(("name", "spec"), SEQ_CASES)
def test_output_padding_follows_input_padding(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec).eval()
    x, padding = make_input(spec)
    out = enc(x, padding)
    assert out.padding is not None
    t, t_out = x.shape[-1], out.tokens.shape[1]
    valid = (~out.padding).sum(dim=1).tolist()
    assert valid == [math.ceil(n * t_out / t) for n in lengths(spec)]
    # right-padded in, right-padded out: once padded, always padded
    assert torch.equal(out.padding, out.padding.cummax(dim=1).values)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("name", "spec"), SEQ_CASES)
def test_padded_values_do_not_change_outputs(name: str, spec: ModalitySpec, mode: str) -> None:
    enc = build(name, spec).train(mode == "train")
    x, padding = make_input(spec)
    assert padding is not None
    with torch.no_grad():
        out = enc(x, padding)
        out_perturbed = enc(perturb_padded(x, padding, spec), padding)
        torch.testing.assert_close(out.pooled, out_perturbed.pooled, atol=1e-5, rtol=1e-5)
        assert out.padding is not None
        keep = ~out.padding
        torch.testing.assert_close(out.tokens[keep], out_perturbed.tokens[keep], atol=1e-5, rtol=1e-5)
        # sanity: the same perturbation without the mask does change the output
        ignored = enc(perturb_padded(x, padding, spec), torch.zeros_like(padding))
        assert not torch.allclose(out.pooled[1], ignored.pooled[1], atol=1e-4)


@pytest.mark.parametrize(("name", "spec"), SEQ_CASES)
def test_padded_sample_equals_the_sample_alone(name: str, spec: ModalitySpec) -> None:
    """Padding is invisible: a short sample inside a padded batch is encoded as if alone."""
    enc = build(name, spec).eval()
    x, padding = make_input(spec)
    assert padding is not None
    with torch.no_grad():
        out = enc(x, padding)
        assert out.padding is not None
        for i, n in enumerate(lengths(spec)):
            alone = enc(x[i : i + 1, ..., :n], padding[i : i + 1, :n])
            torch.testing.assert_close(out.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-4)
            k = int((~out.padding[i]).sum())
            torch.testing.assert_close(out.tokens[i, :k], alone.tokens[0, :k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_every_trainable_parameter_gets_a_gradient(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec).train()
    x, padding = make_input(spec)
    out = enc(x, padding)
    g = torch.Generator().manual_seed(1)
    w_tokens = torch.randn(out.tokens.shape, generator=g)
    if out.padding is not None:
        w_tokens = w_tokens.masked_fill(out.padding[..., None], 0.0)
    loss = (out.pooled * torch.randn(out.pooled.shape, generator=g)).sum() + (out.tokens * w_tokens).sum()
    loss.backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_frozen_encoder_gets_no_gradient_and_stays_in_eval(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec).freeze()
    enc.train()
    assert enc.frozen and not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    buffers = {k: v.clone() for k, v in enc.named_buffers()}
    x, padding = make_input(spec)
    if x.is_floating_point():
        x.requires_grad_(True)
    out = enc(x, padding)
    if x.requires_grad:
        out.pooled.sum().backward()
    else:
        assert not out.pooled.requires_grad
    assert all(p.grad is None for p in enc.parameters())
    for k, v in enc.named_buffers():  # no BatchNorm statistics drift
        assert torch.equal(buffers[k], v), k


@pytest.mark.parametrize("t", [8, 5, 1])
@pytest.mark.parametrize("name", [n for n in SCRATCH if lookup("encoder", n).kind == "audio"])
def test_audio_encoders_handle_short_inputs(name: str, t: int) -> None:
    spec = SPECS["audio"][0]
    enc = build(name, spec).train()
    x, padding = make_input(spec, t=t)
    out = enc(x, padding)
    assert out.pooled.shape == (B, enc.dim) and torch.isfinite(out.pooled).all()
    assert out.padding is not None and not out.padding[:, 0].any()


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_wrong_input_shape_raises_with_shape(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec)
    x, padding = make_input(spec)
    # text/vector: one axis too many; others: one channel too many
    bad = x.float().unsqueeze(1) if spec.kind in ("text", "vector") else torch.cat([x, x[:, :1]], dim=1)
    with pytest.raises(ValueError, match=r"\(4, "):
        enc(bad, padding)


@pytest.mark.parametrize("name", [n for n in SCRATCH if lookup("encoder", n).kind == "text"])
def test_text_padding_defaults_to_pad_id(name: str) -> None:
    spec = SPECS["text"][0]
    enc = build(name, spec).eval()
    x, padding = make_input(spec)
    assert padding is not None
    out = enc(x)
    assert out.padding is not None and torch.equal(out.padding, padding)
    torch.testing.assert_close(out.pooled, enc(x, padding).pooled)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        enc(x.masked_fill(padding, 100))


def test_spec_kwargs_errors() -> None:
    with pytest.raises(ConfigError, match="size"):
        lookup("encoder", "image_vit").spec_kwargs(ModalitySpec("image", channels=3))
    with pytest.raises(ConfigError, match="vocab_size"):
        lookup("encoder", "text_transformer").spec_kwargs(ModalitySpec("text"))
    with pytest.raises(ConfigError, match="patch"):
        create("encoder", "image_vit", in_channels=1, image_size=28, patch=5)


def test_every_encoder_kind_has_a_fixture() -> None:
    assert {lookup("encoder", n).kind for n in available("encoder")} <= set(SPECS)
    assert len(CASES) >= 10


# --------------------------------------------------------------------------- token stem / trunk

TOKEN_STEM = [n for n in SCRATCH if lookup("encoder", n).token_stem]
STEM_CASES = [c for c in CASES if str(c.values[0]) in TOKEN_STEM]
NO_STEM_CASES = [c for c in CASES if str(c.values[0]) not in TOKEN_STEM]
#: Settings with randomness in training mode, so that forward == trunk(stem) is checked under it.
NOISY: dict[str, dict[str, Any]] = {"text_bow": {"word_dropout": 0.5}}


def random_keep(padding: Tensor | None, t: int, k: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """Per-row random subsets of ``k`` of ``t`` stem positions (shuffled), as MAE gathers them."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(B)])
    return keep, None if padding is None else padding.gather(1, keep)


def gather_tokens(tokens: Tensor, keep: Tensor) -> Tensor:
    return tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))


def test_token_stem_encoders_are_the_documented_ones() -> None:
    documented = ["image_vit", "text_transformer", "text_bow", "audio_transformer", "series_transformer"]
    assert sorted(documented) == TOKEN_STEM


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("name", "spec"), STEM_CASES)
def test_forward_is_trunk_of_stem(name: str, spec: ModalitySpec, mode: str) -> None:
    enc = build(name, spec)
    for k, v in NOISY.get(name, {}).items():
        setattr(enc, k, v)
    enc.train(mode == "train")
    x, padding = make_input(spec)
    torch.manual_seed(7)
    out = enc(x, padding)
    torch.manual_seed(7)
    tokens, stem_padding = enc.stem(x, padding)
    split = enc.trunk(tokens, stem_padding)
    assert tokens.shape[-1] == enc.stem_dim and tokens.shape[0] == B
    assert torch.equal(out.tokens, split.tokens) and torch.equal(out.pooled, split.pooled)
    assert (out.padding is None and split.padding is None) or torch.equal(out.padding, split.padding)


@pytest.mark.parametrize(("name", "spec"), STEM_CASES)
def test_trunk_runs_on_a_random_subset_of_stem_tokens(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec).train()
    x, padding = make_input(spec)
    tokens, stem_padding = enc.stem(x, padding)
    t = tokens.shape[1]
    keep, kept_padding = random_keep(stem_padding, t, max(1, t // 3), seed=3)
    out = enc.trunk(gather_tokens(tokens, keep), kept_padding)
    assert out.tokens.shape == (B, keep.shape[1], enc.dim) and out.pooled.shape == (B, enc.dim)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    assert (out.padding is None) == (kept_padding is None)
    (out.pooled.sum() + out.tokens.sum()).backward()
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize(("name", "spec"), STEM_CASES)
def test_dropping_tokens_equals_masking_them(name: str, spec: ModalitySpec) -> None:
    """Positions travel with the tokens: the trunk of a subset is the trunk of all with the rest padded."""
    enc = build(name, spec).eval()
    x, padding = make_input(spec)
    with torch.no_grad():
        tokens, stem_padding = enc.stem(x, padding)
        t = tokens.shape[1]
        base = torch.zeros(B, t, dtype=torch.bool) if stem_padding is None else stem_padding
        keep, kept_padding = random_keep(base, t, max(1, t // 2), seed=5)
        dropped = enc.trunk(gather_tokens(tokens, keep), kept_padding)
        hidden = torch.ones(B, t, dtype=torch.bool).scatter(1, keep, False) | base
        masked = enc.trunk(tokens, hidden)
        assert kept_padding is not None
        valid = ~kept_padding
        torch.testing.assert_close(
            dropped.tokens[valid], gather_tokens(masked.tokens, keep)[valid], atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(dropped.pooled, masked.pooled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "spec"), STEM_CASES)
def test_targets_align_with_stem_tokens(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec)
    x, padding = make_input(spec)
    tokens, _ = enc.stem(x, padding)
    targets = enc.targets(x, padding)
    assert targets.shape[:2] == tokens.shape[:2]
    if spec.kind == "text":
        assert targets.dtype == torch.long and torch.equal(targets, x)
    else:
        assert targets.dim() == 3 and targets.is_floating_point() and torch.isfinite(targets).all()


@pytest.mark.parametrize(("name", "spec"), NO_STEM_CASES)
def test_encoders_without_token_stem_say_so(name: str, spec: ModalitySpec) -> None:
    enc = build(name, spec)
    x, padding = make_input(spec)
    msg = rf"^{name} has no token stem \(masked objectives need one of: {', '.join(TOKEN_STEM)}\)$"
    with pytest.raises(NotImplementedError, match=msg):
        enc.stem(x, padding)
    with pytest.raises(NotImplementedError, match=msg):
        enc.trunk(torch.zeros(B, 3, enc.dim), None)
    with pytest.raises(NotImplementedError, match=msg):
        enc.targets(x, padding)
