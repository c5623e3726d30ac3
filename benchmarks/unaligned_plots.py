"""PNG curves of the pairing and noise sweeps of ``benchmarks/unaligned.py`` (docs/img/unaligned_*.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unaligned_runs import DATASETS, FRACTIONS, NOISE_METHODS, NOISES, PAIRING_METHODS, Row, figure


def plot_pairing(datasets: list[str], store: dict[str, Any], out: Path) -> Path:
    """Figure per dataset across ``datasets`` against paired fraction (log x), one line per method."""
    fig, axes = _panels(len(datasets))
    runs = store.get("runs", {})
    for ax, dataset in zip(axes[0], datasets, strict=True):
        d = DATASETS[dataset]
        full_row = Row("pairing", dataset, PAIRING_METHODS[0], 1.0)
        full = figure(full_row, runs.get(full_row.key))
        for method in PAIRING_METHODS:
            if method.only is not None and dataset not in method.only:
                continue
            xs, ys = [], []
            for f in d.get("fractions", FRACTIONS):
                row = Row("pairing", dataset, PAIRING_METHODS[0] if f == 1.0 else method, f)
                v = figure(row, runs.get(row.key))
                if v is not None:
                    xs.append(100 * f)
                    ys.append(v)
            ax.plot(xs, ys, marker="o", label=method.name)
        if full is not None:
            ax.axhline(full, color="grey", lw=0.8, ls=":")
        ax.axhline(d["chance"], color="black", lw=0.8, ls="--", label="chance")
        ax.set_xscale("log")
        ax.set_xlim(0.05, 200)
        ax.set_xlabel("paired fraction of the training split (%)")
        ax.set_ylabel(f"{d['metric']} (mean of both directions)")
        ax.set_title(dataset)
        # Below the panel: with a dozen methods a legend inside would hide the curves.
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return _save(fig, out)


def plot_noise(datasets: list[str], store: dict[str, Any], out: Path) -> Path:
    """Figure per dataset against the fraction of pairs replaced, one line per objective."""
    fig, axes = _panels(len(datasets))
    runs = store.get("runs", {})
    for ax, dataset in zip(axes[0], datasets, strict=True):
        d = DATASETS[dataset]
        for method in NOISE_METHODS:
            pts = [
                (100 * n, figure(r, runs.get(r.key))) for n in NOISES for r in [Row("noise", dataset, method, noise=n)]
            ]
            if method.oracle:  # no oracle row at 0%: its clean pairs are InfoNCE's
                pts[0] = (0.0, figure(r0 := Row("noise", dataset, NOISE_METHODS[0]), runs.get(r0.key)))
            pts = [(x, y) for x, y in pts if y is not None]
            if len(pts) > int(method.oracle):  # a method not run on this dataset gets no legend entry
                style = {"ls": ":", "color": "black", "marker": "s"} if method.oracle else {"marker": "o"}
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method.name, **style)
        ax.axhline(d["chance"], color="black", lw=0.8, ls="--", label="chance")
        ax.set_xlabel("training pairs replaced by a random partner (%)")
        ax.set_ylabel(f"{d['metric']} (mean of both directions)")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    return _save(fig, out)


def _panels(n: int) -> tuple[Any, Any]:
    """A figure with ``n`` panels side by side (headless Agg backend) and its ``[1, n]`` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)


def _save(fig: Any, out: Path) -> Path:
    """Write ``fig`` to ``out`` as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.subplots_adjust(wspace=0.25)  # not tight_layout: it would shrink the panels to fit outside legends
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
