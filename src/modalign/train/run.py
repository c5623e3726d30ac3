"""A run directory: train, evaluate, embed, generate captions.

``RUN_DIR`` holds ``config.yaml`` (the resolved recipe), ``artifacts/`` (fitted data state such
as tokenizers), ``checkpoints/``, ``metrics.jsonl``, ``eval.json`` and ``plots/``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from modalign.core.errors import ConfigError, RunDirError
from modalign.core.types import Batch
from modalign.data.base import MultimodalDataset
from modalign.data.shards import ShardStream
from modalign.data.transforms.text import TextTokenizer
from modalign.eval import (
    EmbeddingSet,
    embed_loader,
    own_cluster_metrics,
    plot_loss_curve,
    plot_projection,
    plot_similarity_matrix,
    write_eval_json,
)
from modalign.eval.robustness import WithFused, evaluate_with_fused, robustness_metrics, split_fused
from modalign.eval.shards import save_embeddings
from modalign.methods.base import Method
from modalign.objectives.captioning import (
    CaptionDetokenizer,
    Captioning,
    find_captioner,
    greedy_decode,
    score_captions,
    target_counts,
    unigram_scores,
)
from modalign.train.build import build_dataset, build_method, build_train_split, make_loader, resolve_device
from modalign.train.checkpoint import latest_checkpoint, load_weights, write_text_atomic
from modalign.train.distributed import barrier, distributed_session, enable_gather
from modalign.train.fsdp import full_model_state
from modalign.train.loop import Trainer, seed_everything
from modalign.train.recipe import Recipe, dump_recipe, validate_recipe
from modalign.train.records import METRICS_FILE, read_metrics
from modalign.train.run_report import record_command, write_run_report
from modalign.train.tracking import Tracker, log_evaluation, make_tracker

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
ARTIFACTS_DIR = "artifacts"
#: ``train`` keys a resumed run may change: they do not alter what was computed before the checkpoint.
RUN_CONTROL_KEYS = ("skip_nonfinite", "progress_every", "track", "save_every_steps")


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and check that files can be written into it.

    Raises:
        RunDirError: It cannot be created or written to (naming it and the reason).
    """
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise RunDirError(
            f"run directory {run_dir} is not writable ({reason}); pick another --run-dir or make it writable"
        ) from None


def _resume_view(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe without the run-control keys (what must match to resume)."""
    tree: dict[str, Any] = yaml.safe_load(dump_recipe(recipe))
    for key in RUN_CONTROL_KEYS:
        tree["train"].pop(key, None)
    return tree


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, write: bool = True) -> None:
    """Create ``run_dir``, check it is writable and write the resolved recipe; refuse to resume a different recipe.

    With ``write=False`` (ranks other than 0) only the resume check runs.

    Raises:
        RunDirError: If ``run_dir`` cannot be created or written to.
        ConfigError: If ``run_dir`` already holds a run of another recipe and ``resume`` is set
            (only ``RUN_CONTROL_KEYS`` may differ).
    """
    if write:
        ensure_writable(run_dir)
    path = run_dir / CONFIG_FILE
    if resume and path.exists() and latest_checkpoint(run_dir / "checkpoints") is not None:
        old = validate_recipe(yaml.safe_load(path.read_text()), str(path))
        if _resume_view(old) != _resume_view(recipe):
            raise ConfigError(
                "run_dir", f"{run_dir} holds a run of a different recipe; pick a new --run-dir or --no-resume"
            )
    if write:
        write_text_atomic(path, dump_recipe(recipe))


def save_artifacts(dataset: MultimodalDataset | ShardStream, run_dir: Path) -> None:
    """Write the train split's fitted state (``dataset.artifacts()``) into ``run_dir/artifacts``."""
    folder = run_dir / ARTIFACTS_DIR
    folder.mkdir(exist_ok=True)
    for name, text in dataset.artifacts().items():
        write_text_atomic(folder / name, text)


def load_artifacts(run_dir: Path) -> dict[str, str]:
    """``{file name: content}`` saved by ``save_artifacts``."""
    folder = run_dir / ARTIFACTS_DIR
    return {p.name: p.read_text() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def train_run(
    recipe: Recipe,
    run_dir: Path,
    resume: bool = True,
    max_epochs: int | None = None,
    command: list[str] | None = None,
) -> dict[str, float] | None:
    """Train the recipe in ``run_dir`` (resuming if possible), then evaluate.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``) it joins the group and trains data-parallel
    (``train.distributed``); rank 0 alone writes the run directory and evaluates, the other
    ranks wait for it and return ``None``.

    Args:
        recipe: Validated recipe (``data.root`` already resolved by the caller if given).
        run_dir: Run directory.
        resume: Continue from the latest checkpoint of ``run_dir``.
        max_epochs: Stop after this many epochs in this call (the run stays resumable).
        command: The command line of this call, appended to ``RUN_DIR/command.txt``.

    Returns:
        The flat test metrics (on rank 0), or ``None`` if the run stopped before its last epoch.
    """
    with distributed_session(resolve_device(recipe.train.device)) as (dist_ctx, device):
        prepare_run_dir(recipe, run_dir, resume, write=dist_ctx.lead)
        if command and dist_ctx.lead:
            record_command(run_dir, command)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        seed_everything(recipe.train.seed)
        train_ds = build_train_split(recipe)
        if dist_ctx.lead:
            save_artifacts(train_ds, run_dir)
        method = build_method(recipe, train_ds.modalities)
        tracker = make_tracker(recipe.train.track, run_dir, dump_recipe(recipe)) if dist_ctx.lead else Tracker()
        try:
            trainer = Trainer(method, train_ds, recipe.train, run_dir, device, tracker)
            state = trainer.fit(resume=resume, max_epochs=max_epochs)
            enable_gather(method, False)
            if trainer.fsdp:  # evaluation runs on rank 0 alone: an unsharded copy of the weights
                weights = full_model_state(method)  # collective; full tensors on rank 0
                if dist_ctx.lead:
                    method = build_method(recipe, train_ds.modalities)
                    method.load_state_dict(weights)
            metrics = None
            if state.epoch < recipe.train.epochs:
                log.info("stopped after epoch %d of %d; run again to resume", state.epoch, recipe.train.epochs)
            elif dist_ctx.lead:
                metrics = evaluate_method(recipe, method, run_dir, device)
                log_evaluation(tracker, metrics, run_dir / "plots", state.step)
            barrier()
            return metrics
        finally:
            tracker.close()


def load_run(run_dir: Path, data_root: str | None = None) -> tuple[Recipe, Method]:
    """Rebuild the recipe and method of ``run_dir`` with its latest weights.

    Raises:
        FileNotFoundError: If ``run_dir`` has no config or no complete checkpoint.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    recipe = validate_recipe(yaml.safe_load(path.read_text()), str(path))
    if data_root is not None:
        recipe.data = {**recipe.data, "root": str(Path(data_root).resolve())}
    folder = latest_checkpoint(run_dir / "checkpoints")
    if folder is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (checkpoints/latest)")
    train_ds = build_train_split(recipe, artifacts=load_artifacts(run_dir), augment=False)
    method = build_method(recipe, train_ds.modalities)
    load_weights(folder, method)
    return recipe, method


def embed_split(
    recipe: Recipe,
    method: Method,
    dataset: MultimodalDataset | ShardStream,
    device: torch.device,
    fused: bool = False,
    transform: Callable[[Batch], Batch] | None = None,
) -> EmbeddingSet:
    """Embed every sample of ``dataset`` (no augmentation) with ``method``.

    Args:
        recipe: The run's recipe (``eval.batch_size``, ``train.num_workers``).
        method: The trained method.
        dataset: The split to embed.
        device: Device to embed on.
        fused: Also embed the fused representation as modality ``fused`` (``WithFused``).
        transform: Applied to each batch before embedding (robustness perturbations).
    """
    loader = make_loader(dataset, recipe.eval.batch_size, shuffle=False, num_workers=recipe.train.num_workers)
    batches = loader if transform is None else (transform(b) for b in loader)
    embedder = WithFused(method.to(device)) if fused else method.to(device)
    return embed_loader(embedder, batches, device=device)


def evaluate_method(recipe: Recipe, method: Method, run_dir: Path, device: torch.device) -> dict[str, float]:
    """Embed train and test splits, compute the flat metrics, write ``eval.json`` and plots.

    A fusing model's joint representation is evaluated as ``fused/...``; with
    ``eval.robustness`` every metric is also reported with each modality removed and with
    noise on each (``modalign.eval.robustness``).
    """
    artifacts = load_artifacts(run_dir)
    test_ds = build_dataset(recipe, "test", artifacts=artifacts, augment=False)
    test_all = embed_split(recipe, method, test_ds, device, fused=True)
    train_all = None
    if recipe.eval.probe and recipe.eval.label is not None:
        train_ds = build_train_split(recipe, artifacts=artifacts, augment=False, pairing=False)
        train_all = embed_split(recipe, method, train_ds, device, fused=True)
    options: dict[str, Any] = {
        "chunk_size": recipe.eval.chunk_size,
        "knn_k": recipe.eval.knn_k,
        "probe": recipe.eval.probe,
    }
    metrics = evaluate_with_fused(train_all, test_all, recipe.eval.label, **options)
    test, _ = split_fused(test_all)
    if recipe.eval.label is not None:
        metrics |= own_cluster_metrics(dict(method.objectives.items()), test, recipe.eval.label, device)
    if recipe.eval.robustness:

        def embed_perturbed(transform: Callable[[Batch], Batch]) -> EmbeddingSet:
            return embed_split(recipe, method, test_ds, device, fused=True, transform=transform)

        metrics |= robustness_metrics(
            embed_perturbed, train_all, test.modalities, recipe.eval.label, recipe.eval.noise, **options
        )
    write_eval_json(metrics, run_dir / EVAL_FILE)
    if recipe.eval.plots:
        write_plots(recipe, test, run_dir)
    if recipe.eval.report:
        write_run_report(run_dir, recipe, (run_dir / CONFIG_FILE).read_text(), metrics, test, test_ds)
    return metrics


def write_plots(recipe: Recipe, test: EmbeddingSet, run_dir: Path) -> list[Path]:
    """Loss curve, test similarity matrix and 2-D projection into ``run_dir/plots``."""
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        records = [r for r in read_metrics(metrics_path) if "loss" in r]
        if records:
            written.append(plot_loss_curve(records, folder / "loss.png"))
    labels = test.labels.get(recipe.eval.label) if recipe.eval.label else None
    names = sorted(test.embeddings)
    if len(names) >= 2:
        a, b = names[:2]
        both = test.present[a] & test.present[b]
        sub = test.subset(both)
        sub_labels = sub.labels.get(recipe.eval.label) if recipe.eval.label else None
        written.append(
            plot_similarity_matrix(
                sub.embeddings[a], sub.embeddings[b], sub_labels, folder / "similarity.png", names=(a, b)
            )
        )
    written.append(
        plot_projection(
            test.embeddings, labels, folder / "projection.png", method=recipe.eval.projection, present=test.present
        )
    )
    return written


def evaluate_run(run_dir: Path, data_root: str | None = None) -> dict[str, float]:
    """Re-evaluate the latest checkpoint of ``run_dir`` (writes ``eval.json`` and plots)."""
    recipe, method = load_run(run_dir, data_root)
    return evaluate_method(recipe, method, run_dir, resolve_device(recipe.train.device))


def report_run(run_dir: Path, out: Path | None = None, data_root: str | None = None) -> Path:
    """Write the HTML report of ``run_dir`` from its latest checkpoint (default ``RUN_DIR/report.html``).

    Raises:
        FileNotFoundError: If ``run_dir`` has no config or no complete checkpoint.
    """
    recipe, method = load_run(run_dir, data_root)
    dataset = build_dataset(recipe, "test", artifacts=load_artifacts(run_dir), augment=False)
    test = embed_split(recipe, method, dataset, resolve_device(recipe.train.device))
    eval_path = run_dir / EVAL_FILE
    metrics = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    return write_run_report(run_dir, recipe, (run_dir / CONFIG_FILE).read_text(), metrics, test, dataset, out)


def embed_data(run_dir: Path, data: str, out: Path, data_root: str | None = None) -> Path:
    """Embed ``data`` (``train``/``test`` split of the run's dataset, or a manifest file) to ``out``.

    A manifest file is read with the run's own manifest settings and fitted artifacts, so it
    must have the columns the run was trained on.

    Raises:
        ConfigError: If ``data`` is a manifest path but the run was not trained on a manifest.
    """
    recipe, method = load_run(run_dir, data_root)
    dataset = input_dataset(recipe, data, load_artifacts(run_dir))
    emb = embed_split(recipe, method, dataset, resolve_device(recipe.train.device))
    return save_embeddings(emb, out)


def input_dataset(recipe: Recipe, data: str, artifacts: dict[str, str]) -> MultimodalDataset:
    """The ``train``/``test`` split of the run's dataset, or a manifest file read as its test split.

    Raises:
        ConfigError: If ``data`` is a manifest path but the run was not trained on a manifest.
    """
    if data in ("train", "test"):
        return build_dataset(recipe, data, artifacts=artifacts, augment=False)
    if recipe.data.get("name") != "manifest":
        raise ConfigError(
            "--data",
            f"{data!r} is not a split (train|test); a manifest file needs a run trained on the `manifest` dataset",
        )
    recipe.data = {**recipe.data, "test_file": str(Path(data).resolve())}
    return build_dataset(recipe, "test", artifacts=artifacts, augment=False)


def text_tokenizer(dataset: MultimodalDataset, modality: str) -> TextTokenizer:
    """The fitted tokenizer of a text ``modality`` of ``dataset``.

    Datasets keep one ``tokenizer`` (``emoji``) or ``tokenizers`` keyed by the modality
    (``manifest``) or by the suffix after ``_`` (``emoji-multilingual``: ``text_de`` -> ``de``).

    Raises:
        ConfigError: If none is found.
    """
    many: dict[str, TextTokenizer] = dict(getattr(dataset, "tokenizers", {}))
    for key in (modality, modality.rpartition("_")[2]):
        if key in many:
            return many[key]
    one = getattr(dataset, "tokenizer", None)
    if isinstance(one, TextTokenizer) and not many:
        return one
    raise ConfigError("--data", f"the dataset has no tokenizer for text modality {modality!r}", sorted(many))


def generate_run(
    run_dir: Path, data: str, out: Path, max_tokens: int | None = None, data_root: str | None = None
) -> dict[str, float]:
    """Caption ``data`` greedily with the run's captioning decoder; write ``out`` as JSON lines.

    One line per input whose source modality is present, in input order:
    ``{"index": i, "id": sample id, "text": caption[, "reference": its own target text]}``.
    Where inputs carry the target text, the decoder is also scored on it by teacher forcing
    against a unigram baseline fitted on the run's training split (see ``score_captions``).

    Args:
        run_dir: A run trained with a captioning objective (e.g. method ``coca``).
        data: ``train``/``test`` split of the run's dataset, or a manifest file.
        out: Output ``.jsonl`` file.
        max_tokens: Most tokens generated per caption (default: the decoder's ``max_len - 1``).
        data_root: Overrides the recipe's data root.

    Returns:
        ``{"captions": n}`` plus, with references, ``token_accuracy``, ``perplexity``,
        ``unigram_token_accuracy``, ``unigram_perplexity`` and ``reference_tokens``.

    Raises:
        ConfigError: If the run has no captioning objective, ``max_tokens`` does not fit the
            decoder, or ``data`` is neither a split nor (for a manifest run) a manifest.
    """
    recipe, method = load_run(run_dir, data_root)
    captioner = find_captioner(method)
    max_tokens = captioner.head.max_len - 1 if max_tokens is None else max_tokens
    if not 1 <= max_tokens < captioner.head.max_len:
        raise ConfigError("--max-tokens", f"must be in [1, {captioner.head.max_len - 1}], got {max_tokens}")
    artifacts = load_artifacts(run_dir)
    dataset = input_dataset(recipe, data, artifacts)
    device = resolve_device(recipe.train.device)
    method.to(device).eval()
    detokenize = CaptionDetokenizer(text_tokenizer(dataset, captioner.target))
    loader = make_loader(dataset, recipe.eval.batch_size, shuffle=False, num_workers=recipe.train.num_workers)
    lines: list[str] = []
    seen = 0
    for batch in loader:
        batch = batch.to(device)
        ids = greedy_decode(method, method.model, batch, max_tokens).tolist()
        lines += caption_lines(batch, ids, captioner, detokenize, seen)
        seen += batch.size
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines))
    summary = {"captions": float(len(lines))}
    scores = score_captions(captioner, method.model, (b.to(device) for b in loader))
    if scores.tokens:
        train = build_dataset(recipe, "train", artifacts=artifacts, augment=False)
        counts = [
            target_counts(make_loader(d, 256, False), captioner.target, captioner.tokens) for d in (train, dataset)
        ]
        unigram = unigram_scores(*counts)
        summary |= {"token_accuracy": scores.accuracy, "perplexity": scores.perplexity}
        summary |= {"unigram_token_accuracy": unigram.accuracy, "unigram_perplexity": unigram.perplexity}
        summary["reference_tokens"] = float(scores.tokens)
    return summary


def caption_lines(
    batch: Batch, ids: list[list[int]], captioner: Captioning, detokenize: CaptionDetokenizer, start: int
) -> list[str]:
    """JSON lines of a batch's captions: rows with the source modality; ``index`` is ``start`` + row."""
    lines = []
    source, target = batch.rows(captioner.source).tolist(), captioner.target
    refs = batch.rows(target).tolist() if target in batch.data else [False] * batch.size
    for i, row in enumerate(ids):
        if not source[i]:
            continue
        record: dict[str, Any] = {"index": start + i, "id": int(batch.ids[i]), "text": detokenize(row)}
        if refs[i]:
            record["reference"] = detokenize(batch.data[target][i].tolist())
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return lines
