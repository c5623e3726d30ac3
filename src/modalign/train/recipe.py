"""Recipes: typed, validated, serialisable run configurations read from YAML.

A recipe has five sections (``data``, ``model``, ``method``, ``train``, ``eval``). The
``data``/``method`` sections and each encoder/head/fusion entry are *component mappings*
(``{name: ..., **kwargs}``) validated against the registered constructor; the rest are
pydantic models with ``extra="forbid"``. Every error is a ``ConfigError`` naming the key path,
the allowed values and, for typos, the closest match.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from modalign.core.config import apply_overrides, check_component
from modalign.core.errors import ConfigError
from modalign.core.registry import lookup
from modalign.data.pairing import check_views
from modalign.methods.presets import ENTRY_KEYS, entry_labels

#: Constructor arguments the framework fills in (a recipe may not set them).
DATASET_PROVIDED = frozenset({"split", "seed", "augment", "artifacts"})
ENCODER_PROVIDED = frozenset({"in_channels", "vocab_size", "image_size", "length"})
HEAD_PROVIDED = frozenset({"in_dim", "out_dim"})
FUSION_PROVIDED = frozenset({"widths"})
METHOD_PROVIDED: frozenset[str] = frozenset()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataPairing(_Section):
    """Pairing of the training split: keys of ``data`` read out before the dataset is built.

    Every dataset accepts them (``train.build.build_dataset`` wraps the train split in a
    ``modalign.data.pairing.PairingView``); the test split stays fully paired and clean.
    """

    paired_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Training split: fraction of the samples that keep their pairing (seeded by train.seed); "
        "every other sample becomes one unimodal sample per modality it has. The test split stays paired.",
    )
    pair_noise: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Training split: fraction of the kept pairs whose second modality (in sorted order) is "
        "swapped with another noisy pair's, so they are wrong pairs (noisy correspondence); sample ids and "
        "labels are unchanged.",
    )
    paired_per_batch: int | None = Field(
        None,
        ge=0,
        description="Kept pairs in every training batch, the rest unimodal samples "
        "(modalign.data.pairing.MixedBatches; the unimodal samples set the epoch, the pairs are cycled); null = "
        "plain shuffling. One process only for now.",
    )
    unimodal_views: int = Field(
        1,
        ge=1,
        description="With data.paired_per_batch: reads of each unimodal sample in its batch (independently "
        "augmented views with one content id, for within-modality objectives such as unimodal_infonce); it must "
        "divide the unimodal rows of a batch.",
    )

    @property
    def active(self) -> bool:
        """Whether any key differs from its default (the train split is then wrapped)."""
        return (
            self.paired_fraction < 1.0
            or self.pair_noise > 0.0
            or self.paired_per_batch is not None
            or self.unimodal_views > 1
        )


class ModelConfig(_Section):
    """Towers, heads and fusion."""

    embed_dim: int = Field(128, gt=0, description="Width E of the shared embedding space.")
    encoders: dict[str, dict[str, Any]] = Field(
        description="Per modality: an encoder mapping {name: ..., **args}; see `modalign recipes --components`."
    )
    head: dict[str, Any] = Field(
        default_factory=lambda: {"name": "linear"}, description="Projection head for every modality."
    )
    heads: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-modality projection heads overriding `head` ({modality: {name: ..., **args}}); "
        "the key `fused` sets the fusion module's head.",
    )
    fusion: dict[str, Any] = Field(
        default_factory=lambda: {"name": "none"},
        description="Fusion module joining the modalities' tokens into Outputs.fused; `none` = two towers.",
    )
    frozen: list[str] = Field(default_factory=list, description="Modalities whose encoder is frozen.")


class TrainConfig(_Section):
    """Optimisation and run control."""

    epochs: int = Field(10, gt=0, description="Passes over the training split.")
    batch_size: int = Field(
        256, gt=1, description="Samples per step: the global batch, split evenly over the processes under torchrun."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW decoupled weight decay (not on norms/biases/temperature)."
    )
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    fused_adamw: bool = Field(
        False,
        description="Use torch's fused AdamW kernel where the parameters allow it (plain CPU/CUDA tensors; not "
        "under train.fsdp): faster, and no per-parameter temporaries in the update, which set a step's peak memory "
        "once activations are checkpointed. The same update up to rounding, but runs are not bit-equal to runs "
        "without it.",
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final lr as a fraction of the peak.")
    grad_clip: float | None = Field(1.0, description="Max global gradient norm; null disables clipping.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 enables autocast.")
    seed: int = Field(0, description="Seed of parameters, pairing, shuffling and augmentation.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    log_every: int = Field(10, gt=0, description="Steps between metrics.jsonl records.")
    save_every: int = Field(1, gt=0, description="Epochs between checkpoints (the last epoch is always saved).")
    keep_checkpoints: int = Field(2, gt=0, description="How many epoch checkpoints to keep.")
    threads: int | None = Field(None, description="torch intra-op threads; null = torch default.")
    modality_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Probability of removing each observed modality of each training row (never all of a "
        "row's); trains fusion modules to tolerate missing modalities.",
    )
    grad_cache: int | None = Field(
        None,
        gt=0,
        description="Gradient caching (GradCache, Gao et al. 2021): rows per forward chunk; the loss sees the "
        "whole batch while activations are held for one chunk at a time, with the full batch's gradients. "
        "null = off. Objectives must not run the model themselves (Objective.features).",
    )
    fsdp: bool = Field(
        False,
        description="Under torchrun: shard parameters, gradients and optimiser state over the ranks (PyTorch "
        "FSDP2 fully_shard: each encoder, then the whole step) instead of replicating them (DDP). Checkpoints "
        "hold full tensors and resume at any world size.",
    )
    shards: str | None = Field(
        None,
        description="Read the training split from WebDataset tar shards written by `modalign shards build`: "
        "a folder or URL (http(s)://, pipe:) holding index.json. The test split still comes from `data`; the "
        "shards' index carries the fitted tokenizers. null = the `data` dataset's train split.",
    )
    shuffle_buffer: int = Field(
        1000, ge=0, description="With train.shards: samples in each DataLoader worker's shuffle buffer."
    )
    save_every_steps: int | None = Field(
        None,
        gt=0,
        description="With train.shards: also checkpoint every N steps inside an epoch, recording the stream "
        "position; a run resumed from one neither repeats nor skips a sample. null = epoch ends only.",
    )
    skip_nonfinite: int = Field(
        0,
        ge=0,
        description="Batches with a non-finite loss whose optimiser step is skipped (counted in metrics.jsonl) "
        "before the run fails; 0 = fail on the first.",
    )
    progress_every: int | None = Field(
        None,
        gt=0,
        description="When stderr is not a terminal: steps between progress lines; null = one line per epoch.",
    )
    track: Literal["auto", "tensorboard", "none"] = Field(
        "auto",
        description="Experiment tracking into RUN_DIR/tensorboard: auto = when tensorboard is installed "
        "(pip install 'modalign[track]'), tensorboard = required, none = off.",
    )


class EvalConfig(_Section):
    """Evaluation after training (and by `modalign eval`)."""

    label: str | None = Field(None, description="Evaluation label for class-match, zero-shot and probes.")
    chunk_size: int = Field(1024, gt=0, description="Query rows per similarity chunk (memory ~ chunk x gallery).")
    knn_k: int = Field(10, gt=0, description="Neighbours of the kNN classifier.")
    probe: bool = Field(True, description="Fit linear probes and kNN on train embeddings.")
    plots: bool = Field(True, description="Write PNG plots into RUN_DIR/plots.")
    projection: Literal["pca", "tsne"] = Field("pca", description="2-D projection of test embeddings.")
    report: bool = Field(True, description="Write RUN_DIR/report.html (see `modalign report`) after evaluation.")
    batch_size: int = Field(512, gt=0, description="Batch size for embedding the data.")
    robustness: bool = Field(
        False,
        description="Also report every metric with each modality removed (missing:<m>/...) and with noise on "
        "each (noise:<m>/...); see docs/fusion.md.",
    )
    noise: float = Field(
        1.0, ge=0, description="Noise level of the robustness metrics: Gaussian noise of `noise` standard deviations."
    )


class Recipe(_Section):
    """A whole run. ``data`` and ``method`` are component mappings."""

    version: str | None = Field(
        None,
        description="modalign version (major.minor) the recipe is written for; another version's recipe is "
        "refused. The resolved config.yaml records the running version.",
    )
    data: dict[str, Any] = Field(description="Dataset mapping {name: ..., **args}; see `modalign datasets`.")
    model: ModelConfig
    method: dict[str, Any] = Field(
        description="Method mapping: a preset {name: clip|siglip|..., **args} or "
        "{name: composite, objectives: [{name, weight, label, **args}, ...]}."
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig())


def _pydantic_error(err: pydantic.ValidationError) -> ConfigError:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        *parent, key = [str(p) for p in first["loc"]]
        keys = _allowed_keys(parent)
        close = difflib.get_close_matches(key, keys, n=2)
        return ConfigError(path, "unknown key", keys, close)
    expected = first.get("ctx", {}).get("expected")
    allowed: list[str] | None = re.findall(r"'([^']*)'", expected) if expected else None
    return ConfigError(path, f"{first['msg']} (got {first.get('input')!r})", allowed)


def _allowed_keys(parent: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for key in parent:
        annotation = model.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def data_pairing(data: dict[str, Any]) -> tuple[dict[str, Any], DataPairing]:
    """Split a recipe's ``data`` mapping into the dataset's own mapping and its pairing keys.

    Raises:
        ConfigError: At ``data.<key>`` for an invalid pairing value.
    """
    keys = DataPairing.model_fields
    try:
        pairing = DataPairing.model_validate({k: v for k, v in data.items() if k in keys})
    except pydantic.ValidationError as e:
        raise _pydantic_error(e).under("data") from None
    return {k: v for k, v in data.items() if k not in keys}, pairing


def check_pairing(recipe: Recipe, pairing: DataPairing) -> None:
    """Check the pairing keys against the rest of the recipe.

    Raises:
        ConfigError: ``data.paired_per_batch`` above ``train.batch_size``, ``data.unimodal_views``
            without mixed batches or not dividing their unimodal rows, or pairing keys with
            ``train.shards`` (a stream is not re-paired: write the shards from a paired recipe).
    """
    if pairing.paired_per_batch is not None and pairing.paired_per_batch > recipe.train.batch_size:
        raise ConfigError(
            "data.paired_per_batch",
            f"must be at most train.batch_size = {recipe.train.batch_size}, got {pairing.paired_per_batch}",
        )
    check_views(pairing.unimodal_views, pairing.paired_per_batch, recipe.train.batch_size)
    if pairing.active and recipe.train.shards is not None:
        key = next(f"data.{k}" for k, f in DataPairing.model_fields.items() if getattr(pairing, k) != f.default)
        raise ConfigError(
            key,
            "applies to the `data` training split, not to train.shards; write shards of a paired split "
            "(`modalign shards build` with this key) and stream those without it",
        )


def running_version() -> str:
    """``major.minor`` of the installed modalign (what resolved configs record)."""
    from modalign import __version__

    return ".".join(__version__.split(".")[:2])


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", version.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_version(version: object, source: str | None = None) -> None:
    """Refuse a recipe written for a modalign version this one cannot run.

    Compatible means the same major version and, before 1.0, the same minor version; from 1.0 on,
    a minor version not newer than the running one.

    Raises:
        ConfigError: A version that is not a ``major.minor[.patch]`` string, or an incompatible one.
    """
    if version is None:
        return
    where = f"recipe {source}" if source else "the recipe"
    if not isinstance(version, str):
        raise ConfigError("version", f"write it as a quoted string, e.g. version: '{version}' (got {version!r})")
    wanted, running = _major_minor(version), _major_minor(running_version())
    if wanted is None or running is None:
        raise ConfigError("version", f"expected major.minor such as {running_version()!r}, got {version!r}")
    same_line = wanted[0] == running[0] and (wanted[1] == running[1] if running[0] == 0 else wanted[1] <= running[1])
    if not same_line:
        raise ConfigError(
            "version",
            f"{where} is written for modalign {version}, this is modalign {running_version()}; "
            f"install it with pip install 'modalign=={wanted[0]}.{wanted[1]}.*', or update the recipe "
            f"(`modalign recipes --keys` lists this version's keys) and set version: '{running_version()}'",
        )


def validate_recipe(tree: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe tree: its version, sections, then every component mapping.

    Args:
        tree: The parsed YAML (overrides applied).
        source: The file it came from, named in version errors.

    Raises:
        ConfigError: The first problem, with its key path and allowed values.
    """
    if not isinstance(tree, dict):
        raise ConfigError("", f"a recipe must be a mapping, got {type(tree).__name__}")
    check_version(tree.get("version"), source)
    try:
        recipe = Recipe.model_validate(tree)
    except pydantic.ValidationError as e:
        raise _pydantic_error(e) from None
    dataset, pairing = data_pairing(recipe.data)
    check_component("dataset", dataset, "data", DATASET_PROVIDED)
    check_pairing(recipe, pairing)
    expand_method(recipe.method)
    check_component("fusion", recipe.model.fusion, "model.fusion", FUSION_PROVIDED)
    check_component("head", recipe.model.head, "model.head", HEAD_PROVIDED)
    for key, entry in recipe.model.heads.items():
        if key != "fused" and key not in recipe.model.encoders:
            raise ConfigError(
                f"model.heads.{key}", "no encoder of that name", sorted([*recipe.model.encoders, "fused"])
            )
        check_component("head", entry, f"model.heads.{key}", HEAD_PROVIDED)
    for modality, spec in recipe.model.encoders.items():
        check_component("encoder", spec, f"model.encoders.{modality}", ENCODER_PROVIDED)
    unknown = sorted(set(recipe.model.frozen) - set(recipe.model.encoders))
    if unknown:
        raise ConfigError("model.frozen", f"no encoder for {unknown}", sorted(recipe.model.encoders))
    return recipe


@dataclass(frozen=True)
class ObjectiveSpec:
    """One validated objective entry of a method.

    Attributes:
        path: Key path to report errors under (``method`` for presets,
            ``method.objectives.N`` for composite entries).
        label: Log name of the objective (unique within the method).
        name: Registered objective name.
        kwargs: Validated constructor arguments.
        weight: Weight of the objective in the method's loss.
    """

    path: str
    label: str
    name: str
    kwargs: dict[str, Any]
    weight: float


def expand_method(method: dict[str, Any]) -> list[ObjectiveSpec]:
    """Validate a recipe's ``method`` section and expand it into objective entries.

    Raises:
        ConfigError: Unknown method or objective, bad argument, bad weight or repeated label,
            with its key path.
    """
    name, kwargs = check_component("method", method, "method", METHOD_PROVIDED)
    preset = name != "composite"
    try:
        entries = lookup("method", name)(**kwargs)
        labels = entry_labels(entries)
    except ConfigError as e:
        raise e.under("method") from None
    specs = []
    for i, entry in enumerate(entries):
        path = "method" if preset else f"method.objectives.{i}"
        if not isinstance(entry, dict):
            raise ConfigError(path, f"expected an objective mapping {{name: ..., weight: ...}}, got {entry!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"{path}.weight", f"must be a number >= 0, got {weight!r}")
        objective = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        obj_name, obj_kwargs = check_component("objective", objective, path)
        specs.append(ObjectiveSpec(path, labels[i], obj_name, obj_kwargs, float(weight)))
    return specs


def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """``key.path (type, default): description`` for every recipe key (the CLI's key help)."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe_keys(annotation, f"{prefix}{name}."))
            continue
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        type_name = getattr(annotation, "__name__", str(annotation).replace("typing.", ""))
        lines.append(f"{prefix}{name} ({type_name}, {default}): {info.description or ''}")
        if model is Recipe and name == "data":
            lines.extend(describe_keys(DataPairing, f"{prefix}data."))
    return lines


def packaged_recipes() -> dict[str, Path]:
    """``{name: path}`` of the YAML recipes shipped in ``modalign/configs/recipes``."""
    folder = resources.files("modalign") / "configs" / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a packaged recipe by name or a YAML file by path, apply overrides, validate.

    Raises:
        ConfigError: Unknown recipe name (with suggestions), unreadable YAML or invalid content.
    """
    path = Path(name_or_path)
    if not path.suffix:
        known = packaged_recipes()
        if str(name_or_path) not in known:
            close = difflib.get_close_matches(str(name_or_path), list(known), n=2)
            raise ConfigError("recipe", f"unknown recipe {str(name_or_path)!r}", sorted(known), close)
        path = known[str(name_or_path)]
    if not path.is_file():
        raise ConfigError("recipe", f"recipe file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("recipe", f"{path}: invalid YAML: {e}") from None
    return validate_recipe(apply_overrides(tree, overrides or []), str(path))


def dump_recipe(recipe: Recipe) -> str:
    """Serialise the resolved recipe (all defaults filled in, ``version`` stamped) as YAML."""
    tree = recipe.model_dump(mode="json")
    tree["version"] = tree["version"] or running_version()
    return yaml.safe_dump(tree, sort_keys=False)
