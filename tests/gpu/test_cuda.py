"""CUDA equals CPU: the losses, gradient caching, every method's step and tiny real training runs.

Every test is marked ``gpu`` and skips without a CUDA device; ``make test`` deselects them
(``-m "not gpu"``). On a machine with one: ``pytest tests/gpu -m gpu`` (the real-data runs read
``$MODALIGN_DATA``, like ``tests/cli/test_cli_e2e.py``).

* The InfoNCE and sigmoid losses, plain (``chunk_size=0``) and streamed, in float32 on the GPU
  against the CPU in float64, value and every gradient, with and without content ids; under
  bf16 autocast within bf16 precision; at ``B = 8192`` the streamed path against the plain one.
* Gradient caching on the GPU against the full-batch step (and that against the CPU), and the
  replay of each chunk's CUDA dropout masks.
* Every registered method, fusion module (through GMC) and objective (alone in a composite)
  steps on the GPU after its epoch-start hooks: float64 loss and gradients equal to the CPU's
  where the step is deterministic, finite under bf16 autocast.
* ``modalign train av-digits-clip`` on ``cuda`` in fp32 and bf16 beats chance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.core.registry import available, lookup
from modalign.core.types import Batch, EpochContext
from modalign.methods import Method
from modalign.objectives import infonce_loss, sigmoid_loss
from modalign.train.build import build_method
from modalign.train.grad_cache import batch_rows, grad_cache_backward, merge_outputs
from modalign.train.recipe import validate_recipe
from modalign.train.records import read_metrics
from train.test_grad_cache import ENCODERS, METHODS, SPECS, assert_same_step, build, grads, make_batch

pytestmark = pytest.mark.gpu
#: The grad-cache tests' methods (deterministic: no dropout), typed for the calls below.
CACHED: dict[str, dict[str, Any]] = {k: cast("dict[str, Any]", v) for k, v in METHODS.items()}


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device; skips the test without one."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def prefixed(key: str) -> Callable[[str], str]:
    """``assert_close``'s message, prefixed with the compared tensor's name."""
    return lambda message: f"{key}: {message}"


def assert_near(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float, scaled_atol: float) -> None:
    """``got ≈ want`` key by key; ``atol`` is ``scaled_atol * max |want[key]|``."""
    assert got.keys() == want.keys()
    for key, ref in want.items():
        atol = scaled_atol * float(ref.abs().max())
        torch.testing.assert_close(got[key], ref, rtol=rtol, atol=atol, msg=prefixed(key))


# ------------------------------------------------------------------------------------ losses

B, E = 300, 32  # B > PLAIN_MAX_ROWS: chunk_size=None streams (one block); 64 leaves a ragged block
CHUNKS = [0, 64, None]
LOSSES = ["infonce", "infonce_multi", "sigmoid"]


def loss_ids(case: str, n: int = B) -> tuple[Tensor | None, Tensor | None]:
    """Content ids of the ``a`` and ``b`` rows: all distinct, repeats, or repeats on both sides."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, n * 2 // 3, (n,), generator=g)
    return {"distinct": (None, None), "dups": (ids, None), "two_sides": (ids, torch.randperm(n, generator=g) // 2)}[
        case
    ]


def loss_step(
    loss: str, chunk: int | None, ids: tuple[Tensor | None, Tensor | None], device: torch.device | str, **kw: Any
) -> dict[str, Tensor]:
    """Loss and the gradients of ``a [n, E]``, ``b``, the log scale (and bias), as float64 on the CPU.

    The inputs are drawn in float64 on the CPU, then cast to ``kw["dtype"]`` (default float64)
    and moved, so every device and dtype sees the same numbers. ``kw["autocast"]``: forward under
    bf16 autocast, backward outside it (as the trainer does).
    """
    n, dtype, autocast = kw.pop("n", B), kw.pop("dtype", torch.float64), kw.pop("autocast", False)
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(a + 0.8 * torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    x = {"a": a, "b": b, "scale": torch.tensor(2.3, dtype=torch.float64), "bias": torch.tensor(-5.0)}
    x = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in x.items()}
    ids_a, ids_b = (None if i is None else i.to(device) for i in ids)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        if loss == "sigmoid":
            value = sigmoid_loss(x["a"], x["b"], x["scale"], x["bias"], ids_a, ids_b=ids_b, chunk_size=chunk)
        else:
            multi = loss == "infonce_multi"
            value = infonce_loss(x["a"], x["b"], x["scale"], ids_a, ids_b=ids_b, multi_positive=multi, chunk_size=chunk)
    value.backward()
    out = {"loss": value.detach()} | {k: v.grad for k, v in x.items() if v.grad is not None}
    return {k: v.double().cpu() for k, v in out.items()}


@pytest.mark.parametrize("ids", ["distinct", "dups", "two_sides"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_in_float32_on_cuda_equals_cpu_float64(cuda: torch.device, loss: str, chunk: int | None, ids: str) -> None:
    want = loss_step(loss, chunk, loss_ids(ids), "cpu")
    got = loss_step(loss, chunk, loss_ids(ids), cuda, dtype=torch.float32)
    assert set(want) == ({"loss", "a", "b", "scale"} | ({"bias"} if loss == "sigmoid" else set()))
    assert_near(got, want, rtol=1e-4, scaled_atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_under_cuda_bf16_autocast_is_near_float64(cuda: torch.device, loss: str, chunk: int | None) -> None:
    """``train.precision=bf16``: bf16 logits, float32 accumulators; within bf16 precision (CPU: <= 8e-3)."""
    want = loss_step(loss, chunk, loss_ids("dups"), "cpu")
    got = loss_step(loss, chunk, loss_ids("dups"), cuda, dtype=torch.float32, autocast=True)
    for key in want:
        rel = float((got[key] - want[key]).abs().max() / want[key].abs().max())
        assert rel < 3e-2, (key, rel)


@pytest.mark.parametrize("loss", LOSSES)
def test_streamed_equals_plain_at_8192_rows_on_cuda(cuda: torch.device, loss: str) -> None:
    """The default path (blocks of 1024) at a GPU-sized batch against the plain loss in float64."""
    ids = loss_ids("dups", 8192)
    want = loss_step(loss, 0, ids, cuda, n=8192)
    assert_near(loss_step(loss, None, ids, cuda, n=8192, dtype=torch.float32), want, rtol=1e-4, scaled_atol=1e-5)


# -------------------------------------------------------------------------------- grad cache


@pytest.mark.parametrize("kind", sorted(CACHED))
def test_grad_cache_on_cuda_equals_the_full_batch_step(cuda: torch.device, kind: str) -> None:
    """Chunks of 3, 3, 2 rows (text absent from the second) on the GPU, float64, as in tests/train."""
    cpu_batch = make_batch(absent_text=[3, 4, 5])
    ref = build(CACHED[kind])
    ref.train()
    ref.loss(ref(cpu_batch), cpu_batch).loss.backward()
    batch = cpu_batch.to(cuda)
    method = build(CACHED[kind]).to(cuda)
    method.train()
    full = method.loss(method(batch), batch)
    full.loss.backward()
    want = grads(method)
    assert_near({k: v.cpu() for k, v in want.items()}, grads(ref), rtol=1e-6, scaled_atol=1e-9)
    method.zero_grad(set_to_none=True)
    got = grad_cache_backward(method, batch, 3)
    assert_same_step(full.loss, want, got.loss, grads(method))


def test_grad_cache_replays_each_chunks_cuda_dropout_masks(cuda: torch.device) -> None:
    """The CUDA RNG state of each chunk is restored for its replay, and moves on as one pass would."""
    batch = make_batch().to(cuda)
    method = build(CACHED["clip"], head={"name": "mlp", "hidden": 32, "dropout": 0.5}).to(cuda)
    method.train()
    torch.manual_seed(5)
    slices = [slice(0, 3), slice(3, 6), slice(6, 8)]
    ref = method.loss(merge_outputs([method.model(batch_rows(batch, s)) for s in slices], [3, 3, 2]), batch)
    ref.loss.backward()
    want, state_after_ref = grads(method), torch.cuda.get_rng_state(cuda)
    method.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    got = grad_cache_backward(method, batch, 3)
    assert_same_step(ref.loss, want, got.loss, grads(method))
    assert torch.equal(torch.cuda.get_rng_state(cuda), state_after_ref)
    method.zero_grad(set_to_none=True)
    torch.manual_seed(6)  # the masks matter: another seed, another loss
    assert not torch.allclose(grad_cache_backward(method, batch, 3).loss, ref.loss)


# --------------------------------------------------------------------------- every method

PAIR: dict[str, Any] = {"modalities": ["image", "text"]}
#: Every registered method, with the arguments it needs on the three-modality test model;
#: ``gmc+NAME`` trains fusion module NAME; ``only:NAME`` is a composite of objective NAME alone
#: (the objectives no preset uses).
SWEEP: dict[str, dict[str, Any]] = {
    "albef": {},
    "avc": PAIR,
    "barlow": PAIR,
    "clip": PAIR,
    "cmc": {},
    "coca": {"source": "image", "target": "text"},
    "composite": {
        "objectives": [
            {"name": "infonce", "modalities": ["image", "text"]},
            {"name": "vicreg", "modalities": ["image", "audio"]},
        ]
    },
    "data2vec": {"top_k": 1},
    "dcl": PAIR,
    "flava": {},
    "imagebind": {},
    "itm": PAIR,
    "mcn": {**PAIR, "clusters": 3},
    "mlm": {},
    "moco": PAIR,
    "multimae": {},
    "selavi": {**PAIR, "prototypes": 3},
    "siglip": PAIR,
    "vicreg": PAIR,
    "xdc": {**PAIR, "clusters": 3},
} | {f"gmc+{f}": PAIR for f in available("fusion") if f != "none"}
ALONE = ["filip", "milnce", "ot_tokens", "pseudo_pairs", "soft_dtw", "soft_infonce", "unimodal_infonce"]
ALONE += ["weighted_infonce", "window_milnce", "complementary_infonce", "rince"]
SWEEP |= {f"only:{o}": PAIR for o in ALONE}
SWEEP["only:ncr_infonce"] = {**PAIR, "warmup_epochs": 1}  # fits its mixture at the epoch-1 start
SWEEP["only:ncr_rematch"] = {**PAIR, "warmup_epochs": 1}  # fits and re-pairs at the epoch-1 start
SWEEP["only:crossfit_infonce"] = {**PAIR, "warmup_epochs": 1}  # cross-fits its ridge maps at the epoch-1 start
# the rank p-values and local false discovery rates (the hull runs on the CPU, the weights come back)
SWEEP["only:crossfit_infonce/lfdr"] = {**PAIR, "warmup_epochs": 1, "posterior": "lfdr"}


def sweep_method(key: str, device: torch.device | str, dtype: torch.dtype) -> Method:
    """Method ``key`` of ``SWEEP`` on the test model (two towers for the two-modality co-attention).

    Keys: ``method[+fusion]``, or ``only:objective[/variant]`` (a composite of that one objective).
    """
    name, _, fusion = key.partition("+")
    method = {"name": name, **SWEEP[key]}
    if name.startswith("only:"):
        objective = name.removeprefix("only:").partition("/")[0]
        method = {"name": "composite", "objectives": [{"name": objective, **SWEEP[key]}]}
    encoders = {m: e for m, e in ENCODERS.items() if fusion != "coattention" or m != "audio"}
    model: dict[str, Any] = {"embed_dim": 8, "encoders": encoders, "head": {"name": "linear"}}
    if fusion:
        model["fusion"] = {"name": fusion}
    tree = {"data": {"name": "av-digits"}, "model": model, "method": method}
    torch.manual_seed(0)
    specs = {m: SPECS[m] for m in encoders}
    return build_method(validate_recipe(tree), specs).to(device=device, dtype=dtype)


def sweep_batch(key: str, device: torch.device | str, dtype: torch.dtype) -> Batch:
    """The grad-cache test batch (text absent from rows 3-5) in ``dtype``, on ``device``."""
    batch = make_batch(absent_text=[3, 4, 5]).to(device)
    keep = [m for m in batch.data if m != "audio" or "coattention" not in key]
    data = {m: x.to(dtype) if x.is_floating_point() else x for m, x in batch.data.items() if m in keep}
    present = {m: p for m, p in batch.present.items() if m in keep}
    return replace(batch, data=data, present=present, padding={m: p for m, p in batch.padding.items() if m in keep})


def sweep_step(key: str, device: torch.device | str, seed: int, **kw: Any) -> dict[str, Tensor]:
    """One training-mode step after the epoch-start hooks: loss and every gradient, float64 on the CPU."""
    dtype, autocast = kw.get("dtype", torch.float64), kw.get("autocast", False)
    method, batch = sweep_method(key, device, dtype), sweep_batch(key, device, dtype)
    method.train()

    def once() -> Iterator[Batch]:
        return iter([batch])

    for epoch in (0, 1):  # ncr_infonce fits from epoch 1; the clustering methods refit
        method.on_epoch_start(EpochContext(5 * epoch, epoch, 10, 5, once))
    torch.manual_seed(seed)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        out = method.loss(method(batch), batch)
    out.loss.backward()
    return {"loss": out.loss.detach().double().cpu()} | {k: v.double().cpu() for k, v in grads(method).items()}


def test_the_sweep_covers_every_method_fusion_and_objective() -> None:
    assert {k.partition("+")[0] for k in SWEEP if not k.startswith("only:")} == set(available("method"))
    assert {k.partition("+")[2] for k in SWEEP} - {""} == set(available("fusion")) - {"none"}
    built = {type(o) for k in SWEEP for o in sweep_method(k, "cpu", torch.float32).objectives.values()}
    assert built == {lookup("objective", name) for name in available("objective")}


@pytest.mark.parametrize("key", sorted(SWEEP))
def test_every_method_steps_on_cuda_as_on_cpu(cuda: torch.device, key: str) -> None:
    """float64: equal to the CPU step where that is deterministic (same loss under two seeds)."""
    want, other_seed = sweep_step(key, "cpu", 3), sweep_step(key, "cpu", 4)
    got = sweep_step(key, cuda, 3)
    assert got.keys() == want.keys()
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    if torch.equal(want["loss"], other_seed["loss"]):
        assert_near(got, want, rtol=1e-6, scaled_atol=1e-8)


@pytest.mark.parametrize("key", sorted(SWEEP))
def test_every_method_steps_under_cuda_bf16_autocast(cuda: torch.device, key: str) -> None:
    """float32 weights, bf16 autocast forward: finite loss and gradients for the same parameters as fp32."""
    got = sweep_step(key, cuda, 3, dtype=torch.float32, autocast=True)
    assert got.keys() == sweep_step(key, cuda, 3, dtype=torch.float32).keys()
    assert all(bool(torch.isfinite(v).all()) for v in got.values()), [
        k for k, v in got.items() if not v.isfinite().all()
    ]


# ------------------------------------------------------------------------------ real runs


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_av_digits_on_cuda_beats_chance(
    cuda: torch.device, data_root: Path, tmp_path: Path, precision: str
) -> None:
    """The short run of tests/cli/test_cli_e2e.py with ``train.device=cuda``; 10 digits: chance is 0.1."""
    run = tmp_path / "run"
    args = ["av-digits-clip", "train.device=cuda", f"train.precision={precision}", "train.epochs=2"]
    args += ["train.batch_size=128", "data.test_size=500", "model.encoders.image.widths=[16,32]"]
    args += ["model.encoders.audio.widths=[16,32]", "train.num_workers=4", "eval.plots=false", "--no-resume"]
    result = CliRunner().invoke(app, ["train", *args, "--run-dir", str(run), "--data-root", str(data_root)])
    assert result.exit_code == 0, result.output
    losses = [r["epoch_loss"] for r in read_metrics(run / "metrics.jsonl") if "epoch_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["image->audio/p@1"] > 0.5, metrics
    assert metrics["audio->image/p@1"] > 0.3, metrics
    assert metrics["image/linear_probe"] > 0.8, metrics
