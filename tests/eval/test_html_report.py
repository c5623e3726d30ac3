"""The HTML run report: every section present, every embedded asset decodes, nothing external.

Fast tests build the report from synthetic embeddings and previews of every modality kind;
the slow test trains a tiny av-digits run through the CLI and reports it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import wave
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from modalign.cli.main import app
from modalign.core.types import ModalitySpec, Sample
from modalign.data.base import MultimodalDataset
from modalign.data.preview import Preview, image_pixels, sample_previews, token_text
from modalign.data.transforms.image import ImageTransform
from modalign.data.transforms.text import TextTokenizer
from modalign.eval import EmbeddingSet
from modalign.eval.html_report import (
    SECTIONS,
    ReportInputs,
    directions,
    render_report,
    retrieval_examples,
    wav_bytes,
    write_report,
)

# --- parsing and checking a report ----------------------------------------------------------


class ReportParser(HTMLParser):
    """Collects section ids, media sources, links and scripts of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.audio: list[str] = []
        self.external: list[str] = []
        self.text: dict[str, str] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._current = a["id"]
            self.sections.append(a["id"] or "")
            self.text[self._current or ""] = ""
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(tag)
        for key in ("href", "src"):
            value = a.get(key)
            if value is not None and not value.startswith("data:"):
                self.external.append(value)
        if tag == "img":
            self.images.append(a["src"] or "")
        if tag == "audio":
            self.audio.append(a["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self.text[self._current] += data


def _payload(uri: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix), uri[:40]
    return base64.b64decode(uri[len(prefix) :], validate=True)


def check_report(html_text: str) -> ReportParser:
    """Parse a report; assert every section, asset and the absence of external resources."""
    parser = ReportParser()
    parser.feed(html_text)
    parser.close()
    assert parser.sections == list(SECTIONS)
    assert parser.external == []
    for uri in parser.images:
        with Image.open(io.BytesIO(_payload(uri, "image/png"))) as im:
            im.load()
            assert im.format == "PNG" and im.width > 0
    for uri in parser.audio:
        with wave.open(io.BytesIO(_payload(uri, "audio/wav"))) as w:
            assert w.getnframes() > 0 and w.getsampwidth() == 2
    return parser


# --- synthetic inputs -----------------------------------------------------------------------


def _embedding_set(n: int = 12, modalities: tuple[str, ...] = ("audio", "image")) -> EmbeddingSet:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 8, generator=g)
    emb = {m: base + 0.1 * torch.randn(n, 8, generator=g) for m in modalities}
    present = {m: torch.ones(n, dtype=torch.bool) for m in modalities}
    return EmbeddingSet(emb, present, torch.arange(n), {"digit": torch.arange(n) % 3})


def _previews(row: int) -> dict[str, Preview]:
    rng = np.random.default_rng(row)
    return {
        "image": Preview("image", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
        "audio": Preview("audio", np.sin(np.linspace(0, 50, 800)).astype(np.float32), 8000),
        "text": Preview("text", f"<b>row {row}</b> & more"),
        "series": Preview("series", rng.normal(size=(3, 40)).astype(np.float32)),
        "vector": Preview("vector", rng.normal(size=4).astype(np.float32)),
        "mel": Preview("audio", rng.normal(size=(10, 20)).astype(np.float32)),
    }


def _inputs(test: EmbeddingSet, command: str | None = "modalign train x") -> ReportInputs:
    records = [{"step": s, "epoch": s // 5, "loss": 2.0 / (s + 1), "loss/infonce": 1.0 / (s + 1)} for s in range(1, 20)]
    return ReportInputs(
        title="a <test> run",
        metrics={"image->audio/R@1": 0.5},
        records=records,
        config_text="data: {name: <x>}",
        command=command,
        test=test,
        previews=_previews,
        label="digit",
        n_queries=2,
        top_k=3,
    )


# --- fast tests -----------------------------------------------------------------------------


def test_report_of_every_modality_kind(tmp_path: Path) -> None:
    kinds = ("audio", "image", "mel", "series", "text", "vector")
    test = _embedding_set(modalities=kinds)
    inputs = _inputs(test)
    inputs.max_directions = 10  # audio against every other kind, both ways: every kind is a query and a match
    inputs.n_queries, inputs.top_k = 1, 2
    out = write_report(inputs, tmp_path / "sub" / "report.html")
    parser = check_report(out.read_text(encoding="utf-8"))
    assert len(parser.audio) > 0 and len(parser.images) > 3
    assert "<b>row" in parser.text["retrieval"]  # text is escaped, shown as text
    assert "modalign train x" in parser.text["command"]
    assert "data: {name: <x>}" in parser.text["config"]
    assert "image->audio/R@1" in parser.text["metrics"]
    assert not list(out.parent.glob(".*tmp*"))  # written atomically


def test_report_without_command_or_metrics_or_loss() -> None:
    inputs = _inputs(_embedding_set(), command=None)
    inputs.metrics, inputs.records = None, []
    parser = check_report(render_report(inputs))
    assert "not recorded" in parser.text["command"]
    assert "not evaluated" in parser.text["metrics"]
    assert "no loss" in parser.text["loss"]


def test_report_of_one_modality() -> None:
    parser = check_report(render_report(_inputs(_embedding_set(modalities=("image",)))))
    assert "one modality only" in parser.text["retrieval"]


def test_retrieval_examples_rank_by_cosine_and_show_duplicates_once() -> None:
    test = _embedding_set(n=6)
    test.embeddings["audio"][3] = test.embeddings["audio"][1]  # one recording paired twice
    test.embeddings["image"][1] = test.embeddings["audio"][1]
    examples = retrieval_examples(test, "image", "audio", n_queries=6, top_k=6)
    assert [e.query for e in examples] == list(range(6))
    ex = examples[1]
    assert ex.matches[0][0] == 1  # the own pair wins the tie with row 3
    assert 3 not in [r for r, _ in ex.matches]
    sims = [s for _, s in ex.matches]
    assert sims == sorted(sims, reverse=True) and len(ex.matches) == 5
    assert ex.pair_rank == 1
    for e in examples:  # the pair's rank counts the gallery rows scoring strictly higher
        g = torch.nn.functional.normalize(test.embeddings["audio"], dim=1)
        s = g @ torch.nn.functional.normalize(test.embeddings["image"][e.query], dim=0)
        assert e.pair_rank == 1 + int((s > s[e.query]).sum())
    assert directions(["b", "a", "c"], 3) == [("a", "b"), ("b", "a"), ("a", "c")]


def test_retrieval_examples_skip_absent_rows() -> None:
    test = _embedding_set(n=6)
    test.present["audio"][:4] = False
    examples = retrieval_examples(test, "image", "audio", n_queries=5, top_k=5)
    assert [e.query for e in examples] == [4, 5]
    assert all(r >= 4 for e in examples for r, _ in e.matches)


def test_wav_round_trip() -> None:
    samples = np.array([0.0, 0.5, -0.5, 2.0], dtype=np.float32)
    with wave.open(io.BytesIO(wav_bytes(samples, 8000))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (8000, 1, 4)
        pcm = np.frombuffer(w.readframes(4), dtype="<i2")
    assert pcm.tolist() == [0, 16384, -16384, 32767]  # clipped, not wrapped


class _Tiny(MultimodalDataset):
    """Two samples of every kind, for the default previews."""

    def __init__(self) -> None:
        self.image_tf = ImageTransform(4, 3, mean=0.5, std=0.25)
        self.tokenizer = TextTokenizer.fit(["a grey cat", "a dog asleep"], vocab_size=50, model="word")

    @property
    def modalities(self) -> dict[str, ModalitySpec]:
        return {
            "image": ModalitySpec("image", channels=3, size=4),
            "text": ModalitySpec("text", vocab_size=self.tokenizer.vocab_size),
            "series": ModalitySpec("series", channels=2),
            "vector": ModalitySpec("vector", channels=3),
            "audio": ModalitySpec("audio", channels=5),
        }

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Sample:
        pixels = np.full((4, 4, 3), 200, dtype=np.uint8)
        values = {
            "image": self.image_tf(pixels),
            "text": self.tokenizer.encode("a grey cat"),
            "series": torch.ones(2, 7),
            "vector": torch.arange(3.0),
            "audio": torch.zeros(5, 9),
        }
        return Sample(id=index, values=values, labels={})


def test_default_previews_undo_the_transforms() -> None:
    previews = _Tiny().previews(0)
    image = previews["image"].value
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (4, 4, 3)
    assert np.abs(image.astype(int) - 200).max() <= 1
    assert previews["text"].value == "a grey cat"
    assert previews["series"].value.shape == (2, 7)  # type: ignore[union-attr]
    assert previews["audio"].kind == "audio" and not previews["audio"].is_waveform
    assert sample_previews(_Tiny(), 1).keys() == previews.keys()
    assert token_text(torch.tensor([5, 6, 0]), None) == "token ids: 5 6"
    grey = image_pixels(torch.tensor([[[0.0, 2.0]]]), None)  # min-max without a transform
    assert grey.reshape(-1).tolist() == [0, 255]


# --- a real run through the CLI -------------------------------------------------------------


@pytest.mark.slow
def test_train_writes_report_and_report_command(data_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train", "av-digits-clip", "train.epochs=1", "train.batch_size=128", "data.test_size=100",
            "model.encoders.image.widths=[8,16]", "model.encoders.audio.widths=[8,16]", "eval.probe=false",
            "eval.plots=false", "--run-dir", str(run), "--data-root", str(data_root)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    parser = check_report((run / "report.html").read_text(encoding="utf-8"))
    assert "modalign train av-digits-clip" in parser.text["command"]
    assert "--run-dir" in parser.text["command"]
    assert len(parser.audio) >= 4 and len(parser.images) >= 10  # players and digit images
    metrics = json.loads((run / "eval.json").read_text())
    assert f"{metrics['image->audio/p@1']:.4f}" in parser.text["metrics"]

    (run / "command.txt").unlink()  # an older run, made before the command was recorded
    out = tmp_path / "elsewhere" / "r.html"
    again = runner.invoke(app, ["report", str(run), "--out", str(out), "--data-root", str(data_root)])
    assert again.exit_code == 0, again.output
    assert "wrote" in again.output
    assert "not recorded" in check_report(out.read_text(encoding="utf-8")).text["command"]

    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "error:" in missing.output


def test_base64_payloads_are_strict() -> None:
    with pytest.raises(binascii.Error):
        _payload("data:image/png;base64,@@@", "image/png")
