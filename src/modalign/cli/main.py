"""The ``modalign`` command line: train, eval, audit-pairs, report, embed, generate, recipes, datasets, shards.

A thin layer over ``modalign.train`` and ``modalign.data``: every command parses options,
calls one library function and prints its result. Errors that modalign raises on purpose are
printed as one ``error: ...`` line with exit status 2 (no traceback).
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from modalign.core.errors import ConfigError, ModalignError
from modalign.eval import format_table
from modalign.train.recipe import load_recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="modalign: self-supervised multimodal representation learning.",
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[str, typer.Argument(help="A packaged recipe name (see `modalign recipes`) or a YAML file.")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides as key.path=value, e.g. train.epochs=5.", show_default=False)
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder holding the datasets (default: data.root, then $MODALIGN_DATA)."),
]


def _fail(err: Exception) -> None:
    from modalign.train.distributed import launch_context

    typer.echo(f"error: {launch_context().tag()}{err}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default: runs/RECIPE-TIMESTAMP).")] = None,
    data_root: DataRootOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR's latest checkpoint if there is one.")] = True,
    max_epochs: Annotated[
        int | None, typer.Option(help="Stop after this many epochs in this call; rerun to resume.")
    ] = None,
) -> None:
    """Train a recipe, evaluate it on the test split and write RUN_DIR/eval.json.

    Under `torchrun --nproc_per_node N -m modalign train ...` it trains data-parallel on N
    processes; train.batch_size is the global batch, and only rank 0 prints and writes.
    """
    from modalign.train.distributed import launch_context
    from modalign.train.run import train_run

    lead = launch_context().lead
    try:
        rec = load_recipe(recipe, overrides or [])
        if data_root is not None:
            rec.data = {**rec.data, "root": str(data_root.resolve())}
        folder = run_dir or Path("runs") / f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if lead:
            typer.echo(f"run directory: {folder}")
        start = time.perf_counter()
        command = _train_command(recipe, overrides or [], folder, data_root, resume, max_epochs)
        metrics = train_run(rec, folder, resume=resume, max_epochs=max_epochs, command=command)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    if not lead:
        return
    if metrics is None:
        typer.echo(f"stopped early; resume with: modalign train {recipe} --run-dir {folder}")
        return
    typer.echo(format_table(metrics))
    typer.echo(f"done in {time.perf_counter() - start:.0f} s; metrics in {folder / 'eval.json'}")


def _train_command(
    recipe: str, overrides: list[str], run_dir: Path, data_root: Path | None, resume: bool, max_epochs: int | None
) -> list[str]:
    """The ``modalign train`` command line of these arguments (with the run directory chosen).

    Under ``torchrun`` it starts with the launcher: ``torchrun --nproc_per_node N -m modalign``.
    """
    from modalign.train.distributed import launcher_command

    args = [*launcher_command(), "train", recipe, *overrides, "--run-dir", str(run_dir)]
    args += ["--data-root", str(data_root)] if data_root is not None else []
    args += [] if resume else ["--no-resume"]
    return args + (["--max-epochs", str(max_epochs)] if max_epochs is not None else [])


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `modalign train`.")],
    data_root: DataRootOpt = None,
) -> None:
    """Re-evaluate a run's latest checkpoint; rewrites RUN_DIR/eval.json, plots and report.html."""
    from modalign.train.run import evaluate_run

    try:
        metrics = evaluate_run(run_dir, str(data_root) if data_root else None)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(format_table(metrics))


@app.command("audit-pairs")
def audit_pairs_command(
    recipe: Annotated[
        str, typer.Argument(help="A packaged recipe name, a YAML file, or a run directory (its recipe and weights).")
    ],
    overrides: OverridesArg = None,
    modalities: Annotated[
        str | None, typer.Option("--modalities", help="The two modalities to audit, a,b (default: the dataset's two).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write one CSV row per pair, most suspect first.")] = None,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write a page showing the most and least suspect pairs' values.")
    ] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Estimate how many training pairs are mismatched, and which (cross-fitted agreement, local FDR).

    Reads the encoders' pooled vectors (a recipe's frozen pretrained encoders, or a run
    directory's trained ones), scores every pair out of sample as `crossfit_infonce` with
    `posterior: lfdr` does, and prints the estimated share of mismatched pairs; under
    data.pair_noise also the AUC, precision and recall against the injected truth.
    """
    from modalign.train.audit import audit_recipe_pairs
    from modalign.train.run import CONFIG_FILE

    try:
        chosen = tuple(modalities.split(",")) if modalities else None
        if (Path(recipe) / CONFIG_FILE).is_file():
            if overrides:
                raise ConfigError("overrides", f"{recipe} is a run directory: its recipe is used as it was trained")
            report = audit_recipe_pairs(None, Path(recipe), chosen, data_root=data_root)
        else:
            rec = load_recipe(recipe, overrides or [])
            report = audit_recipe_pairs(rec, None, chosen, data_root=data_root)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    for key, value in report.summary().items():
        typer.echo(f"{key:>15}  {value:.4f}" if key != "pairs" else f"{key:>15}  {value:.0f}")
    if out is not None:
        typer.echo(f"wrote {report.write_csv(out)}")
    if html_out is not None:
        typer.echo(f"wrote {report.write_html(html_out)}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `modalign train`.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output HTML file (default: RUN_DIR/report.html).")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Write one self-contained HTML report of a run: metrics, plots, retrieval examples, config."""
    from modalign.train.run import report_run

    try:
        path = report_run(run_dir, out, str(data_root) if data_root else None)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def embed(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `modalign train`.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output .npz (embeddings/<m>, present/<m>, ids, labels/<l>); a directory with --shard-size."
        ),
    ],
    data: Annotated[
        str, typer.Option("--data", help="Split of the run's dataset (train|test) or a manifest file.")
    ] = "test",
    data_root: DataRootOpt = None,
    shard_size: Annotated[
        int | None,
        typer.Option("--shard-size", min=1, help="Stream rows into numbered .npz shards of N rows plus index.json."),
    ] = None,
) -> None:
    """Embed a dataset split, or a manifest file, with a trained run."""
    from modalign.train.export import embed_data_shards
    from modalign.train.run import embed_data

    root = str(data_root) if data_root else None
    try:
        if shard_size is None:
            path = embed_data(run_dir, data, out, root)
        else:
            path = embed_data_shards(run_dir, data, out, shard_size, root)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"wrote {path}")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory trained with a captioning objective (coca).")],
    out: Annotated[Path, typer.Option("--out", help="Output .jsonl: one {index, id, text[, reference]} per input.")],
    data: Annotated[
        str,
        typer.Option(
            "--data", help="Split of the run's dataset (train|test) or a manifest file with the run's columns."
        ),
    ] = "test",
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Most tokens per caption (default: the decoder's longest).")
    ] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Caption inputs greedily with a run's captioning decoder; score it where inputs have references."""
    from modalign.train.run import generate_run

    try:
        summary = generate_run(run_dir, data, out, max_tokens, str(data_root) if data_root else None)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"wrote {int(summary['captions'])} captions to {out}")
    if "token_accuracy" in summary:
        typer.echo(
            f"teacher-forced on {int(summary['reference_tokens'])} reference tokens: "
            f"token accuracy {summary['token_accuracy']:.4f} (unigram {summary['unigram_token_accuracy']:.4f}), "
            f"perplexity {summary['perplexity']:.2f} (unigram {summary['unigram_perplexity']:.2f})"
        )


@app.command()
def recipes(
    show: Annotated[str | None, typer.Option(help="Print the named recipe's YAML.")] = None,
    components: Annotated[bool, typer.Option(help="List registered components of every kind.")] = False,
    keys: Annotated[bool, typer.Option(help="Explain every recipe key (type, default, meaning).")] = False,
) -> None:
    """List the packaged recipes (and registered components or recipe keys)."""
    from modalign.core.registry import KIND_MODULES, available
    from modalign.train.recipe import describe_keys, packaged_recipes

    if keys:
        typer.echo("\n".join(describe_keys()))
        return
    known = packaged_recipes()
    if show is not None:
        if show not in known:
            _fail(ModalignError(f"unknown recipe {show!r}; allowed: {', '.join(sorted(known))}"))
        typer.echo(known[show].read_text())
        return
    for name in sorted(known):
        typer.echo(name)
    if components:
        for kind in KIND_MODULES:
            typer.echo(f"{kind}: {', '.join(available(kind))}")


datasets_app = typer.Typer(help="List built-in datasets; fetch them from their upstream sources.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context) -> None:
    """List the built-in datasets, their modalities, splits and expected files."""
    if ctx.invoked_subcommand is not None:
        return
    from modalign.data.catalog import CATALOG

    for info in CATALOG.values():
        typer.echo(info.describe())


@datasets_app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="Dataset name (see `modalign datasets`).")],
    root: Annotated[Path, typer.Option("--root", help="Data root to install into.")] = Path("data"),
    mirror: Annotated[
        str | None, typer.Option(help="Base URL replacing the upstream (e.g. file:///mnt/mirror).")
    ] = None,
) -> None:
    """Download a built-in dataset and verify its checksums."""
    from modalign.data.fetch import fetch as fetch_dataset

    try:
        files = fetch_dataset(name, root, mirror=mirror)
    except (ModalignError, KeyError, OSError) as e:
        _fail(e)
    typer.echo(f"installed {len(files)} file(s) under {root}")


shards_app = typer.Typer(help="Write a dataset split as WebDataset tar shards, for streamed training (train.shards).")
app.add_typer(shards_app, name="shards")


@shards_app.command("build")
def shards_build(
    recipe: RecipeArg,
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the .tar shards and index.json into.")],
    overrides: OverridesArg = None,
    split: Annotated[str, typer.Option(help="Split of the recipe's dataset to write (train|test).")] = "train",
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per shard.")] = 1000,
    data_root: DataRootOpt = None,
) -> None:
    """Write a split of the recipe's dataset (or manifest) as tar shards in the WebDataset layout.

    Values are written as the dataset gives them without augmentation. Train from the shards
    with `modalign train RECIPE train.shards=OUT_DIR`; `train.save_every_steps=N` then also
    checkpoints inside epochs, and a resumed run continues the stream exactly.
    """
    from modalign.train.build import write_recipe_shards

    try:
        rec = load_recipe(recipe, overrides or [])
        if data_root is not None:
            rec.data = {**rec.data, "root": str(data_root.resolve())}
        index = write_recipe_shards(rec, out_dir, split, shard_size)
    except (ModalignError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"wrote {index.count} samples in {len(index.shards)} shard(s) and index.json to {out_dir}")
    typer.echo(f"train from them with: modalign train {recipe} train.shards={out_dir}")


@contextmanager
def _download_bar(name: str) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar for first-use dataset downloads (tqdm; off when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    with tqdm(desc=f"fetch {name}", unit="B", unit_scale=True, disable=None, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            if total and bar.total != total:
                bar.reset(total=total)
            bar.update(done - bar.n)

        yield progress


def main() -> None:
    """Console entry point."""
    from modalign.data.locate import set_download_progress
    from modalign.train.distributed import launch_context

    # under torchrun only rank 0 logs progress and information; every rank logs warnings
    level = logging.INFO if launch_context().lead else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if sys.stderr.isatty():
        set_download_progress(_download_bar)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack: where a hung rank waits
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    app()
