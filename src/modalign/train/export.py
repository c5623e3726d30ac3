"""Sharded embedding export of a trained run (``modalign embed RUN_DIR --out DIR --shard-size N``)."""

from __future__ import annotations

from pathlib import Path

from modalign.eval.shards import write_embedding_shards
from modalign.train.build import make_loader, resolve_device
from modalign.train.run import input_dataset, load_artifacts, load_run


def embed_data_shards(run_dir: Path, data: str, out_dir: Path, shard_size: int, data_root: str | None = None) -> Path:
    """Embed ``data`` with ``run_dir``'s latest checkpoint into numbered shards of ``shard_size`` rows.

    ``data`` is read as by ``embed_data`` (a ``train``/``test`` split or a manifest file); rows are
    streamed batch by batch into ``out_dir`` (``modalign.eval.shards`` layout), so memory holds
    one shard at most, however large the split.

    Returns:
        Path of ``out_dir/index.json``.

    Raises:
        ConfigError: If ``data`` is a manifest path but the run was not trained on a manifest.
        EvalInputError: If ``shard_size < 1``.
    """
    recipe, method = load_run(run_dir, data_root)
    dataset = input_dataset(recipe, data, load_artifacts(run_dir))
    device = resolve_device(recipe.train.device)
    loader = make_loader(dataset, recipe.eval.batch_size, shuffle=False, num_workers=recipe.train.num_workers)
    return write_embedding_shards(method.to(device), loader, out_dir, shard_size, device)
