import pytest
import torch

from modalign.core import available, create
from modalign.core.config import check_component
from modalign.core.errors import ConfigError


def test_heads_are_registered() -> None:
    assert {"identity", "linear", "mlp"} <= set(available("head"))


def test_identity_head_locks_the_space() -> None:
    head = create("head", "identity", in_dim=6, out_dim=6)
    x = torch.randn(3, 6)
    assert torch.equal(head(x), x) and not list(head.parameters())
    with pytest.raises(ConfigError, match=r"model\.embed_dim.*width 6, got 4"):
        create("head", "identity", in_dim=6, out_dim=4)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_input_dropout(name: str) -> None:
    torch.manual_seed(0)
    plain = create("head", name, in_dim=16, out_dim=4)
    torch.manual_seed(0)
    dropped = create("head", name, in_dim=16, out_dim=4, input_dropout=0.5)
    x = torch.randn(8, 16, requires_grad=True)
    dropped.eval()  # evaluation: no dropout, the same map
    # the same weights in the same order (an mlp's Sequential indices shift by the Dropout in front)
    dropped.load_state_dict(dict(zip(dropped.state_dict(), plain.state_dict().values(), strict=True)))
    torch.testing.assert_close(dropped(x), plain(x))
    dropped.train()
    dropped(x).sum().backward()
    assert x.grad is not None
    dead = (x.grad == 0).float().mean().item()  # dropped input entries get no gradient
    assert 0.3 < dead < 0.7
    with pytest.raises(ValueError, match="input_dropout"):
        create("head", name, in_dim=16, out_dim=4, input_dropout=1.0)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_head_shapes_and_gradients(name: str) -> None:
    head = create("head", name, in_dim=12, out_dim=5)
    x = torch.randn(4, 12, requires_grad=True)
    y = head(x)
    assert y.shape == (4, 5)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_mlp_head_layers_and_hidden() -> None:
    head = create("head", "mlp", in_dim=6, out_dim=3, hidden=10, layers=3)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 10), (10, 10), (10, 3)]
    one = create("head", "mlp", in_dim=6, out_dim=3, layers=1)
    assert len([m for m in one.modules() if isinstance(m, torch.nn.Linear)]) == 1
    with pytest.raises(ValueError, match="layers >= 1"):
        create("head", "mlp", in_dim=6, out_dim=3, layers=0)


def test_head_config_is_validated_from_hints() -> None:
    provided = frozenset({"in_dim", "out_dim"})
    recipe = {"name": "mlp", "hidden": "64", "layers": 3}
    name, kwargs = check_component("head", recipe, "model.head", provided)
    assert name == "mlp" and kwargs == {"hidden": 64, "layers": 3}
    with pytest.raises(ConfigError, match=r"model\.head\.in_dim"):
        check_component("head", {"name": "mlp", "in_dim": 3}, "model.head", provided)
    with pytest.raises(ConfigError, match=r"model\.head\.layers"):
        check_component("head", {"name": "mlp", "layers": "many"}, "model.head", provided)
