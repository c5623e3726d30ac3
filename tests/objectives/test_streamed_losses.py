"""Fast path equals slow path: the streamed (blockwise) InfoNCE and sigmoid losses against the plain ones.

``chunk_size=0`` builds the full ``N x N`` logits (itself tested against loop and NumPy
references in ``test_contrastive.py`` / ``test_sigmoid.py``); ``chunk_size > 0`` streams over
blocks. Both must agree in value and in the gradients of ``a``, ``b``, the scale and the bias,
with and without duplicate ids, for batch sizes that blocks do not divide, and for blocks of one
row. A dispatch-mode recorder checks that no ``N x N`` tensor is ever allocated.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from modalign.core import Batch, ConfigError, Outputs, create
from modalign.objectives import infonce_loss, sigmoid_loss
from modalign.objectives.streamed import DEFAULT_CHUNK, PLAIN_MAX_ROWS, resolve_chunk

N = 13  # not divisible by the chunks below
CHUNKS = [1, 3, 5, 13, 64]
IDS = torch.tensor([0, 1, 2, 1, 4, 5, 0, 7, 1, 9, 10, 5, 12])  # 0, 1 and 5 repeat
IDS_B = torch.tensor([3, 3, 2, 8, 9, 7, 0, 4, 6, 5, 1, 11, 10])  # b-side ids: 3 repeats
ID_CASES = {"distinct": (None, None), "dups": (IDS, None), "two_sides": (IDS, IDS_B)}


def leaves(n: int, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """L2-normalised ``a, b [n, 6]`` (b near a), a log scale and a bias, all requiring gradient."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, 6, generator=g, dtype=dtype), dim=-1)
    b = F.normalize(a + 0.8 * torch.randn(n, 6, generator=g, dtype=dtype), dim=-1)
    scale, bias = torch.tensor(2.3, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
    return {k: v.clone().requires_grad_() for k, v in {"a": a, "b": b, "scale": scale, "bias": bias}.items()}


def run(loss: str, n: int, chunk: int | None, ids: Any, seed: int = 0, **kw: Any) -> dict[str, Tensor]:
    """Loss and gradients of every leaf for one path."""
    x = leaves(n, seed, kw.pop("dtype", torch.float64))
    ids_a, ids_b = ids
    if loss == "infonce":
        value = infonce_loss(x["a"], x["b"], x["scale"], ids_a, ids_b=ids_b, chunk_size=chunk, **kw)
    else:
        value = sigmoid_loss(x["a"], x["b"], x["scale"], x["bias"], ids_a, ids_b=ids_b, chunk_size=chunk)
    value.backward()
    out = {"loss": value.detach()}
    out.update({k: v.grad for k, v in x.items() if v.grad is not None})
    return out


def assert_same(streamed: dict[str, Tensor], plain: dict[str, Tensor], rtol: float = 1e-10) -> None:
    assert streamed.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(streamed[key], plain[key], rtol=rtol, atol=rtol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("case", list(ID_CASES))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_streamed_infonce_equals_plain(chunk: int, case: str, multi: bool) -> None:
    ids = ID_CASES[case]
    plain = run("infonce", N, 0, ids, multi_positive=multi)
    assert set(plain) == {"loss", "a", "b", "scale"}
    assert_same(run("infonce", N, chunk, ids, multi_positive=multi), plain)


@pytest.mark.parametrize("case", list(ID_CASES))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_streamed_sigmoid_equals_plain(chunk: int, case: str) -> None:
    ids = ID_CASES[case]
    plain = run("sigmoid", N, 0, ids)
    assert set(plain) == {"loss", "a", "b", "scale", "bias"}
    assert_same(run("sigmoid", N, chunk, ids), plain)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 24),
    chunk=st.integers(1, 9),
    id_range=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    loss=st.sampled_from(["infonce", "infonce_multi", "sigmoid"]),
)
def test_streamed_equals_plain_for_any_batch_chunk_and_ids(
    n: int, chunk: int, id_range: int, seed: int, loss: str
) -> None:
    ids = (torch.randint(0, id_range, (n,), generator=torch.Generator().manual_seed(seed)), None)
    kw = {"multi_positive": True} if loss == "infonce_multi" else {}
    name = "sigmoid" if loss == "sigmoid" else "infonce"
    assert_same(run(name, n, chunk, ids, seed, **kw), run(name, n, 0, ids, seed, **kw))


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_float32_default_path_streams_and_matches_plain(loss: str) -> None:
    n = PLAIN_MAX_ROWS + 45  # above the automatic threshold: chunk_size=None streams
    assert resolve_chunk(None, n) == DEFAULT_CHUNK
    ids = (torch.arange(n) % 200, None)
    streamed = run(loss, n, None, ids, dtype=torch.float32)
    assert_same(streamed, run(loss, n, 0, ids, dtype=torch.float32), rtol=2e-5)


@pytest.mark.parametrize("loss", ["infonce", "infonce_multi", "sigmoid"])
def test_streamed_runs_under_bf16_autocast_near_float32(loss: str) -> None:
    """train.precision=bf16: block logits come out of autocast in bf16 while the accumulators are
    float32; the streamed path must take that mix (it raised a dtype mismatch in ``addmm_`` /
    ``index_add_``) and stay within bf16 precision of the float32 plain loss and gradients."""
    name = "sigmoid" if loss == "sigmoid" else "infonce"
    kw = {"multi_positive": True} if loss == "infonce_multi" else {}
    want = run(name, N, 0, (IDS, None), dtype=torch.float32, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(name, N, 5, (IDS, None), dtype=torch.float32, **kw)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.float32, key
        rel = float((got[key] - want[key]).abs().max() / want[key].abs().max())
        assert rel < 3e-2, (key, rel)  # measured <= 1.4e-2


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
@pytest.mark.parametrize("case", ["distinct", "dups"])
def test_streamed_path_never_allocates_n_by_n(loss: str, case: str) -> None:
    n, chunk = 300, 32
    ids = (torch.arange(n) % 97, None) if case == "dups" else (None, None)
    for path, bound in ((chunk, chunk * chunk), (0, n * n)):
        with LargestTensor() as rec:
            run(loss, n, path, ids)
        assert (rec.numel <= max(bound, n * 6)) and (path == 0) == (rec.numel >= n * n)


def test_sigmoid_without_grad_and_single_backward() -> None:
    x = leaves(N, 1)
    with torch.no_grad():
        value = sigmoid_loss(x["a"], x["b"], x["scale"], x["bias"], chunk_size=4)
    torch.testing.assert_close(value, sigmoid_loss(x["a"], x["b"], x["scale"], x["bias"], chunk_size=0))
    loss = sigmoid_loss(x["a"], x["b"], x["scale"], x["bias"], chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_scale_and_bias_of_shape_one_get_gradients_of_shape_one() -> None:
    x = leaves(N, 2)
    scale, bias = x["scale"].detach().reshape(1).requires_grad_(), x["bias"].detach().reshape(1).requires_grad_()
    (
        infonce_loss(x["a"], x["b"], scale, chunk_size=4) + sigmoid_loss(x["a"], x["b"], scale, bias, chunk_size=4)
    ).backward()
    assert scale.grad is not None and scale.grad.shape == (1,)
    assert bias.grad is not None and bias.grad.shape == (1,)


def test_chunk_size_choices() -> None:
    assert resolve_chunk(None, PLAIN_MAX_ROWS) is None
    assert resolve_chunk(None, PLAIN_MAX_ROWS + 1) == DEFAULT_CHUNK
    assert resolve_chunk(0, 10**6) is None
    assert resolve_chunk(7, 3) == 7
    x = leaves(4, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        infonce_loss(x["a"], x["b"], x["scale"], chunk_size=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        sigmoid_loss(x["a"], x["b"], x["scale"], x["bias"], chunk_size=-2)


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_objectives_take_chunk_size(name: str) -> None:
    emb = {
        m: F.normalize(torch.randn(N, 6, generator=torch.Generator().manual_seed(i)), dim=-1)
        for i, m in enumerate("ab")
    }
    batch = Batch(data={}, present={}, ids=IDS)
    plain = create("objective", name, modalities=["a", "b"], chunk_size=0)
    streamed = create("objective", name, modalities=["a", "b"], chunk_size=4)
    streamed.load_state_dict(plain.state_dict())
    want = plain(Outputs(embeddings=emb), batch).loss
    torch.testing.assert_close(streamed(Outputs(embeddings=emb), batch).loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="chunk_size"):
        create("objective", name, modalities=["a", "b"], chunk_size=-1)
