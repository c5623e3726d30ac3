import pytest

from modalign.core.config import apply_overrides, check_component, parse_override
from modalign.core.errors import ConfigError, UnknownComponentError
from modalign.core.registry import available, create, lookup, register


def test_register_and_create_drop_none_kwargs():
    @register("head", "_test_head")
    def make(in_dim: int, out_dim: int = 3) -> tuple[int, int]:
        return (in_dim, out_dim)

    assert "_test_head" in available("head")
    assert create("head", "_test_head", in_dim=2, out_dim=None) == (2, 3)
    assert available("head", "_test_*") == ["_test_head"]
    with pytest.raises(KeyError, match="already registered"):
        register("head", "_test_head")(make)


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownComponentError) as e:
        lookup("objective", "infonse")
    assert "infonce" in e.value.close
    assert "allowed:" in str(e.value)


def test_unknown_kind():
    with pytest.raises(KeyError, match="unknown component kind"):
        available("widget")


def test_check_component_validates_keys_and_types():
    provided = frozenset({"in_dim", "out_dim"})
    name, kwargs = check_component("head", {"name": "mlp", "hidden": "64"}, "model.head", provided)
    assert name == "mlp" and kwargs == {"hidden": 64}
    with pytest.raises(ConfigError, match=r"model\.head\.hiden: unknown argument.*did you mean 'hidden'"):
        check_component("head", {"name": "mlp", "hiden": 64}, "model.head", frozenset({"in_dim", "out_dim"}))
    with pytest.raises(ConfigError, match=r"model\.head\.hidden: invalid value 'wide'"):
        check_component("head", {"name": "mlp", "hidden": "wide"}, "model.head", frozenset({"in_dim", "out_dim"}))
    with pytest.raises(ConfigError, match=r"model\.head\.name: unknown head 'mpl'.*did you mean 'mlp'"):
        check_component("head", {"name": "mpl"}, "model.head")
    # framework-provided arguments may not be set by a recipe
    with pytest.raises(ConfigError, match=r"model\.head\.in_dim: unknown argument"):
        check_component("head", {"name": "mlp", "in_dim": 3}, "model.head", frozenset({"in_dim", "out_dim"}))


def test_overrides():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    tree = {"train": {"epochs": 3}}
    out = apply_overrides(tree, ["train.epochs=5", "model.encoders.image.name=image_vit"])
    assert out["train"]["epochs"] == 5 and tree["train"]["epochs"] == 3
    assert out["model"]["encoders"]["image"]["name"] == "image_vit"
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match=r"train\.epochs: is a value"):
        apply_overrides(tree, ["train.epochs.x=1"])
