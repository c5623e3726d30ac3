"""The trainer's optimizer: AdamW with decay groups, fused kernel where the parameters allow it."""

from __future__ import annotations

import copy

import torch
from torch.optim import AdamW

from modalign.core import ModalitySpec
from modalign.methods import Method
from modalign.train.build import build_method
from modalign.train.optim import fused_adamw_supported, make_optimizer
from modalign.train.recipe import TrainConfig, validate_recipe

SPECS = {m: ModalitySpec("vector", channels=6) for m in ("a", "b")}


def small_method(fused: bool = True) -> tuple[Method, TrainConfig]:
    torch.manual_seed(0)
    recipe = validate_recipe(
        {
            "data": {"name": "av-digits"},
            "model": {"embed_dim": 4, "encoders": {m: {"name": "vector_mlp", "dim": 8, "hidden": 8} for m in SPECS}},
            "method": {"name": "clip"},
            "train": {"lr": 0.01, "weight_decay": 0.1, "fused_adamw": fused},
        }
    )
    return build_method(recipe, SPECS), recipe.train


def test_fused_when_asked_on_plain_cpu_parameters_and_not_on_other_devices() -> None:
    method, cfg = small_method()
    opt = make_optimizer(method, cfg)
    assert all(group["fused"] for group in opt.param_groups)
    default, cfg_default = small_method(fused=False)
    assert not any(group["fused"] for group in make_optimizer(default, cfg_default).param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    assert fused_adamw_supported(list(method.parameters()))
    assert not fused_adamw_supported([torch.nn.Parameter(torch.zeros(2, device="meta"))])


def test_fused_steps_equal_the_per_parameter_loop() -> None:
    method, cfg = small_method()
    reference = copy.deepcopy(method)
    fused = make_optimizer(method, cfg)
    twin = dict(zip(map(id, method.parameters()), reference.parameters(), strict=True))  # same order
    groups = [
        {"params": [twin[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
        for group in fused.param_groups
    ]
    loop = AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for (_, p), (_, q) in zip(method.named_parameters(), reference.named_parameters(), strict=True):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    for (name, p), (_, q) in zip(method.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(
        not torch.equal(p, q0) for p, q0 in zip(method.parameters(), small_method()[0].parameters(), strict=True)
    )
