"""Helpers shared by the sections of ``benchmarks/unaligned.py``: sentence embedding, alignment metrics."""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor
from torch.nn import functional as F

from modalign.core.types import ModalitySpec, Sample
from modalign.data.collate import collate
from modalign.encoders.stitch import MiniLMText


@torch.no_grad()
def embed(encoder: MiniLMText, texts: list[str], batch: int = 256) -> Tensor:
    """MiniLM sentence embeddings ``[N, 384]``, through modalign's ``text_minilm`` wrapper."""
    spec = {"text": ModalitySpec("text", vocab_size=30522)}
    out = []
    for start in range(0, len(texts), batch):
        samples = [
            Sample(id=i, values={"text": encoder.preprocess(t)}) for i, t in enumerate(texts[start : start + batch])
        ]
        b = collate(samples, spec)
        out.append(encoder.encode_live(b.data["text"], b.padding["text"]).pooled)
    return torch.cat(out)


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def centred(x: Tensor) -> Tensor:
    """Mean-centred, then L2-normalised rows (the usual preprocessing of embedding alignment)."""
    return F.normalize(x - x.mean(dim=0), dim=1)


def retrieval(src: Tensor, tgt: Tensor, w: Tensor, csls_k: int | None) -> dict[str, float]:
    """P@1 and P@10 of translating row ``i`` of ``src @ w`` to row ``i`` of ``tgt`` (cosine or CSLS)."""
    a, b = F.normalize(src @ w, dim=1), F.normalize(tgt, dim=1)
    scores = a @ b.T
    if csls_k is not None:
        ra = scores.topk(csls_k, dim=1).values.mean(1)
        rb = scores.T.topk(csls_k, dim=1).values.mean(1)
        scores = 2 * scores - ra[:, None] - rb[None, :]
    top = scores.topk(10, dim=1).indices
    truth = torch.arange(len(src))[:, None]
    return {
        "p@1": float((top[:, :1] == truth).any(1).float().mean()),
        "p@10": float((top == truth).any(1).float().mean()),
    }
