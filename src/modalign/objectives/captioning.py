"""Autoregressive captioning: CoCa's captioning loss and greedy decoding (Yu et al. 2022).

After Yu, Wang, Vasudevan, Yeung, Seyedhosseini and Wu 2022, "CoCa: Contrastive Captioners are
Image-Text Foundation Models". A causal transformer decoder reads the caption tokens of a
``target`` text modality and cross-attends to the token features of a ``source`` modality (the
unimodal image encoder's tokens in CoCa); it is trained by teacher forcing to predict each next
token. The ``coca`` method (``methods/captioning.py``) adds it to a contrastive loss.

* ``teacher_forcing`` turns the batch's ``[CLS] w1 .. wn [PAD] ..`` ids into decoder inputs
  ``[BOS] w1 .. wn`` and targets ``w1 .. wn [EOS]``;
* ``caption_loss`` is the token-level cross-entropy averaged over the valid target tokens (of
  every rank's batch with ``gather``);
* ``Captioning`` owns the decoder (``CaptionDecoder``: token embedding tied to the output
  projection, learned positions, ``TransformerDecoder(causal=True)``), created in ``bind`` from
  the target encoder's ``vocab_size`` and the source encoder's width;
* ``greedy_decode`` captions a batch's source rows; ``score_captions`` and ``unigram_scores``
  measure teacher-forced token accuracy and perplexity against a unigram baseline.

Special ids: the tokenizer (``modalign.data.transforms.text``) trains ``SPECIAL_TOKENS``
(``[PAD]``, ``[UNK]``, ``[CLS]``) first, at ids 0, 1, 2, and appends ``APPENDED_SPECIAL_TOKENS``
(``[MASK]``, ``[BOS]``, ``[EOS]``) after the trained vocabulary, so with ``V = vocab_size``
``[BOS] = V - 2`` and ``[EOS] = V - 1``. ``caption_tokens`` derives them from those tuples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders
from torch import Tensor, nn

from modalign.core.errors import ConfigError
from modalign.core.modules import Objective
from modalign.core.registry import register
from modalign.core.types import Batch, LossOutput, Outputs
from modalign.data.transforms.text import (
    APPENDED_SPECIAL_TOKENS,
    BOS,
    CLS,
    EOS,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    TextTokenizer,
)
from modalign.distributed import all_gather_sizes, is_initialized, world_size
from modalign.nn.attention import TransformerDecoder
from modalign.nn.layers import LearnedPositions

#: ``(inputs [N, T], context [N, S, D_c], context_padding [N, S] | None) -> logits [N, T, V]``.
StepLogits = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class CaptionTokens:
    """Special token ids of a vocabulary of ``vocab_size`` ids (see the module doc).

    Attributes:
        vocab_size: Number of ids ``V``.
        pad: ``[PAD]`` (0). cls: ``[CLS]``. mask: ``[MASK]``. bos: ``[BOS]``. eos: ``[EOS]``.
    """

    vocab_size: int
    pad: int
    cls: int
    mask: int
    bos: int
    eos: int

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Ids that are never a caption target, so greedy decoding never emits them."""
        return (self.pad, self.cls, self.mask, self.bos)


def caption_tokens(vocab_size: int) -> CaptionTokens:
    """The special ids of a ``TextTokenizer`` vocabulary of ``vocab_size`` ids.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the six special tokens.
    """
    n_appended = len(APPENDED_SPECIAL_TOKENS)
    if vocab_size < len(SPECIAL_TOKENS) + n_appended:
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(SPECIAL_TOKENS) + n_appended} special tokens")
    first = vocab_size - n_appended  # APPENDED_SPECIAL_TOKENS occupy the last ids, in order

    def appended(token: str) -> int:
        return first + APPENDED_SPECIAL_TOKENS.index(token)

    return CaptionTokens(
        vocab_size, SPECIAL_TOKENS.index(PAD), SPECIAL_TOKENS.index(CLS), appended(MASK), appended(BOS), appended(EOS)
    )


def teacher_forcing(ids: Tensor, padding: Tensor | None, bos: int, eos: int) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder inputs and next-token targets of encoded captions.

    Each row is ``[CLS] w1 .. wn`` followed by padding (``TextTokenizer.encode``; a trailing
    ``[EOS]``, as ``encode(bos_eos=True)`` writes, is dropped from the words). The input is
    ``[BOS] w1 .. wn`` and the target ``w1 .. wn [EOS]``; both are trimmed to the longest row.

    Args:
        ids: ``LongTensor[N, T]`` token ids, first token the ``[CLS]``/``[BOS]`` slot.
        padding: ``BoolTensor[N, T]`` (``True`` = padded, right padding) or ``None``: ``ids == 0``.
        bos: Id of ``[BOS]``.
        eos: Id of ``[EOS]``.

    Returns:
        ``(inputs LongTensor[N, L], targets LongTensor[N, L], padding BoolTensor[N, L])`` with
        ``L = max n + 1``; padded positions hold id 0.

    Raises:
        ValueError: If ``ids`` is not 2-D, ``padding`` has another shape, or a row is empty.
    """
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"teacher_forcing expects token ids LongTensor[N, T], got {ids.dtype} {tuple(ids.shape)}")
    padding = ids == 0 if padding is None else padding.bool()
    if padding.shape != ids.shape:
        raise ValueError(f"teacher_forcing: padding {tuple(padding.shape)} does not match ids {tuple(ids.shape)}")
    lengths = (~padding).sum(dim=1)
    if ids.shape[0] and int(lengths.min()) < 1:
        raise ValueError("teacher_forcing: every row needs its first ([CLS]) token")
    last = ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    words = lengths - 1 - ((last == eos) & (lengths > 1)).long()
    width = int(words.max()) + 1 if ids.shape[0] else 1
    pos = torch.arange(width, device=ids.device)[None, :]
    ids = F.pad(ids, (0, max(0, width + 1 - ids.shape[1])))
    inputs = torch.where(pos == 0, bos, ids[:, :width])
    targets = torch.where(pos < words[:, None], ids[:, 1 : width + 1], eos)
    valid = pos <= words[:, None]
    return inputs.masked_fill(~valid, 0), targets.masked_fill(~valid, 0), ~valid


def caption_loss(
    logits: Tensor, targets: Tensor, padding: Tensor, label_smoothing: float = 0.0, gather: bool = False
) -> Tensor:
    """Token-level cross-entropy of next-token predictions, averaged over valid tokens (CoCa).

    ``sum_{i,t valid} CE(logits[i, t], targets[i, t]) / #valid``; with ``label_smoothing = e``
    each term is ``(1 - e) * -log p(target) + e * mean_k -log p(k)`` (Szegedy et al. 2016).

    With ``gather=True`` and an initialised process group the denominator is the number of
    valid tokens of every rank; each rank returns ``world_size * sum_local / #valid_total``, so
    the mean over ranks is the loss of the global batch and each rank's gradient divided by
    the world size is the single-process gradient. Ranks may hold different numbers of rows
    and tokens, including none.

    Args:
        logits: ``Tensor[N, T, V]`` next-token logits (or any ``[..., V]``, e.g. ``[M, V]`` of
            the valid positions only).
        targets: ``LongTensor[N, T]`` target ids (any value at padded positions).
        padding: ``BoolTensor[N, T]``, ``True`` where there is no target.
        label_smoothing: ``e`` in ``[0, 1)``.
        gather: Average over the valid tokens of all ranks.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: On mismatched shapes, ``label_smoothing`` outside ``[0, 1)``, or (without
            gathering) no valid token.
    """
    if logits.dim() < 2 or targets.shape != logits.shape[:-1] or padding.shape != targets.shape:
        raise ValueError(
            f"caption_loss expects logits [N, T, V], targets and padding [N, T]; got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(padding.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    valid = ~padding.bool()
    count = int(valid.sum())
    distributed = gather and is_initialized()
    total = sum(all_gather_sizes(count, logits.device)) if distributed else count
    if total == 0:
        if not distributed:
            raise ValueError("caption_loss got no valid target token")
        return 0.0 * logits.sum()
    ce = F.cross_entropy(logits[valid], targets[valid], reduction="sum", label_smoothing=label_smoothing)
    return ce * ((world_size() if distributed else 1) / total)


class CaptionDecoder(nn.Module):
    """Token embedding, learned positions, causal cross-attention decoder, tied output projection.

    ``logits = LN(Decoder(E[x] + P)) @ E.T + b``: the output projection reuses the input
    embedding ``E`` (weight tying, Press & Wolf 2017) with its own bias.

    Args:
        vocab_size: Number of token ids ``V``.
        context_dim: Width ``D_c`` of the context tokens.
        dim: Decoder width ``D``.
        depth: Decoder blocks.
        heads: Attention heads (must divide ``dim``).
        max_len: Longest input sequence.
        mlp_ratio: Hidden width of the block MLP relative to ``dim``.
        dropout: Dropout in attention and MLP.
    """

    def __init__(
        self,
        vocab_size: int,
        context_dim: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.positions = LearnedPositions(dim, max_len)
        self.decoder = TransformerDecoder(dim, depth, heads, context_dim, True, mlp_ratio, dropout)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, inputs: Tensor, context: Tensor, context_padding: Tensor | None = None) -> Tensor:
        """Next-token logits ``Tensor[N, T, V]`` of ``inputs: LongTensor[N, T]`` over ``context [N, S, D_c]``.

        Raises:
            ValueError: If ``T > max_len`` or the context shapes do not fit.
        """
        return self.project(self.hidden(inputs, context, context_padding))

    def hidden(self, inputs: Tensor, context: Tensor, context_padding: Tensor | None = None) -> Tensor:
        """Final decoder states ``Tensor[N, T, D]`` (``forward`` before the output projection).

        No query padding mask is needed: padding is on the right and attention is causal, so a
        valid position never attends to a padded one (states at padded positions are ignored).

        Raises:
            ValueError: If ``T > max_len`` or the context shapes do not fit.
        """
        return self.decoder(self.positions(self.embed(inputs)), context, None, context_padding)

    def project(self, h: Tensor) -> Tensor:
        """Logits ``Tensor[..., V]`` of decoder states ``[..., D]`` (tied embedding plus bias)."""
        return F.linear(h, self.embed.weight, self.out_bias)


def greedy_search(
    step: StepLogits, context: Tensor, context_padding: Tensor | None, max_tokens: int, tokens: CaptionTokens
) -> Tensor:
    """Greedy autoregressive decoding, one row per context.

    Starting from ``[BOS]``, each step appends the argmax of the last position's logits (ids in
    ``tokens.never_generated`` excluded) until every row has emitted ``[EOS]`` or ``max_tokens``
    tokens were generated. The whole prefix is re-run at each step (no key/value cache).

    Args:
        step: The decoder, ``(inputs [N, t], context, context_padding) -> logits [N, t, V]``.
        context: ``Tensor[N, S, D_c]``.
        context_padding: ``BoolTensor[N, S]`` or ``None``.
        max_tokens: Most tokens generated per row.
        tokens: The vocabulary's special ids.

    Returns:
        ``LongTensor[N, L]``, ``L <= max_tokens``: generated ids, ``[EOS]`` included where
        emitted and ``[PAD]`` after it.
    """
    n = context.shape[0]
    seq = torch.full((n, 1), tokens.bos, dtype=torch.long, device=context.device)
    done = torch.zeros(n, dtype=torch.bool, device=context.device)
    banned = torch.tensor(tokens.never_generated, device=context.device)
    for _ in range(max_tokens):
        logits = step(seq, context, context_padding)[:, -1].clone()
        logits[:, banned] = float("-inf")
        nxt = logits.argmax(dim=-1).masked_fill(done, tokens.pad)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | (nxt == tokens.eos)
        if bool(done.all()):
            break
    return seq[:, 1:]


@register("objective", "captioning")
class Captioning(Objective):
    """CoCa's captioning loss: a causal decoder over ``target`` text cross-attending to ``source`` tokens.

    Reads ``outputs.tokens[source]`` (``Tensor[B, S, D_c]``, with ``outputs.padding.get(source)``)
    and the batch's ``target`` ids; only rows where both modalities were observed are used.
    ``features`` writes the teacher-forced ``logits [M, V]`` and ``targets [M]`` of the ``M``
    valid target positions of those rows (see ``teacher_forcing``) to ``outputs.extras``;
    ``forward`` is ``caption_loss`` of them. A batch without such rows gives a zero loss
    connected to the decoder.

    Args:
        source: The modality captioned (default: the model's modality other than ``target``).
        target: The text modality generated (default: the model's only text modality).
        dim: Decoder width.
        depth: Decoder blocks.
        heads: Decoder attention heads (must divide ``dim``).
        max_len: Longest caption (in tokens, ``[BOS]`` included) the decoder reads.
        mlp_ratio: Hidden width of the decoder MLP relative to ``dim``.
        dropout: Dropout in the decoder.
        label_smoothing: Label smoothing of the cross-entropy (CoCa: 0).
        gather: Average over the tokens of every rank (data parallelism).
    """

    def __init__(
        self,
        source: str | None = None,
        target: str | None = None,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        gather: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ConfigError("heads", f"heads={heads} must divide dim={dim}")
        if depth < 1:
            raise ConfigError("depth", f"must be >= 1, got {depth}")
        if max_len < 2:
            raise ConfigError("max_len", f"must be >= 2 ([BOS] and one token), got {max_len}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        self._source, self._target = source, target
        self.sizes = {"dim": dim, "depth": depth, "heads": heads, "max_len": max_len}
        self.mlp_ratio, self.dropout = mlp_ratio, dropout
        self.label_smoothing = label_smoothing
        self.gather = gather
        self.decoder: CaptionDecoder | None = None
        self._tokens: CaptionTokens | None = None

    @property
    def source(self) -> str:
        """The captioned modality (resolved by ``bind``)."""
        return self._resolved()[0]

    @property
    def target(self) -> str:
        """The generated text modality (resolved by ``bind``)."""
        return self._resolved()[1]

    @property
    def head(self) -> CaptionDecoder:
        """The decoder (created by ``bind``).

        Raises:
            ValueError: If the objective was not bound to a model.
        """
        if self.decoder is None:
            raise ValueError("captioning: not bound to a model (the decoder is created by bind)")
        return self.decoder

    @property
    def tokens(self) -> CaptionTokens:
        """Special ids of the target vocabulary (set by ``bind``)."""
        if self._tokens is None:
            raise ValueError("captioning: not bound to a model")
        return self._tokens

    def _resolved(self) -> tuple[str, str]:
        if self._source is None or self._target is None:
            raise ValueError("captioning: source/target not given and not bound to a model")
        return self._source, self._target

    def bind(self, model: nn.Module) -> None:
        """Resolve ``source``/``target``, read the vocabulary and create the decoder.

        Raises:
            ConfigError: If a modality is unknown, ``target`` is not text, or a default cannot
                be resolved.
        """
        encoders: dict[str, nn.Module] = dict(getattr(model, "encoders", {}).items())
        texts = [m for m, e in encoders.items() if getattr(e, "kind", "") == "text"]
        target = self._target or _only(texts, "target", "text modality")
        source = self._source or _only([m for m in encoders if m != target], "source", "modality besides the target")
        for key, name in (("source", source), ("target", target)):
            if name not in encoders:
                raise ConfigError(key, f"captioning: the model has no encoder for {name!r}", sorted(encoders))
        vocab, width = getattr(encoders[target], "vocab_size", None), getattr(encoders[source], "dim", None)
        if source == target or not isinstance(vocab, int) or not isinstance(width, int):
            raise ConfigError("target", f"captioning: {target!r} must be a text modality other than the source", texts)
        self._source, self._target, self._tokens = source, target, caption_tokens(vocab)
        self.decoder = CaptionDecoder(vocab, width, mlp_ratio=self.mlp_ratio, dropout=self.dropout, **self.sizes)

    def features(self, model: nn.Module, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        """Teacher-forced ``logits [M, V]`` and ``targets [M]`` at the paired rows' valid positions (or nothing)."""
        source, target = self.source, self.target
        if source not in outputs.tokens or target not in batch.data:
            return {}
        context = outputs.tokens[source]
        keep = batch.rows(source).to(context.device) & batch.rows(target).to(context.device)
        if not bool(keep.any()):
            return {}
        text_padding = batch.padding.get(target)
        ids = batch.data[target][keep]
        inputs, targets, padding = teacher_forcing(
            ids, text_padding[keep] if text_padding is not None else None, self.tokens.bos, self.tokens.eos
        )
        context_padding = outputs.padding.get(source)
        cpad = context_padding[keep] if context_padding is not None else None
        valid = ~padding  # project only the valid positions: the vocabulary matmul is the costly part
        return {
            "logits": self.head.project(self.head.hidden(inputs, context[keep], cpad)[valid]),
            "targets": targets[valid],
        }

    def forward(self, outputs: Outputs, batch: Batch) -> LossOutput:
        """Compute the loss; metrics: ``tokens`` (valid targets) and ``token_acc`` (teacher-forced)."""
        logits = outputs.extras.get(self.key("logits"))
        params = list(self.head.parameters())
        if logits is None:
            if not (self.gather and is_initialized()):
                return LossOutput(loss=outputs.zero(*params), metrics={"tokens": 0.0})
            empty = torch.zeros(0, 1, dtype=torch.long, device=params[0].device)
            loss = caption_loss(empty[..., None].float(), empty, empty.bool(), self.label_smoothing, True)
            return LossOutput(loss=loss + outputs.zero(*params), metrics={"tokens": 0.0})
        targets = outputs.extras[self.key("targets")]
        padding = torch.zeros_like(targets, dtype=torch.bool)
        loss = caption_loss(logits, targets, padding, self.label_smoothing, self.gather)
        with torch.no_grad():
            hits = float((logits.argmax(dim=-1) == targets).sum())
        metrics = {"tokens": float(targets.numel()), "token_acc": hits / max(1, targets.numel())}
        return LossOutput(loss=loss, metrics=metrics)

    def decode(self, context: Tensor, context_padding: Tensor | None, max_tokens: int) -> Tensor:
        """Greedy captions ``LongTensor[N, <= max_tokens]`` of ``context [N, S, D_c]`` (see ``greedy_search``).

        Raises:
            ValueError: If ``max_tokens`` is not in ``[1, max_len - 1]``.
        """
        limit = self.head.max_len - 1
        if not 1 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in [1, {limit}] (the decoder's max_len - 1), got {max_tokens}")
        return greedy_search(self.head, context, context_padding, max_tokens, self.tokens)


def _only(names: list[str], key: str, what: str) -> str:
    """The single element of ``names``.

    Raises:
        ConfigError: If there is not exactly one (naming ``key`` and the candidates).
    """
    if len(names) != 1:
        raise ConfigError(key, f"captioning: set {key}; the model has not exactly one {what}", sorted(names))
    return names[0]


def find_captioner(module: nn.Module) -> Captioning:
    """The ``Captioning`` objective of a method (or the objective itself).

    Raises:
        ConfigError: If ``module`` holds none, or several.
    """
    found = [m for m in module.modules() if isinstance(m, Captioning)]
    if len(found) != 1:
        labels = sorted(m.label or "captioning" for m in found)
        what = "no captioning objective (use method coca, or add {name: captioning})" if not found else "several"
        raise ConfigError("method", f"the method has {what}", labels)
    return found[0]


@torch.no_grad()
def greedy_decode(method_or_objective: nn.Module, model: nn.Module, batch: Batch, max_tokens: int = 32) -> Tensor:
    """Caption the ``source`` rows of ``batch`` greedily (call ``.eval()`` on the method first).

    Args:
        method_or_objective: A ``Method`` holding one ``Captioning`` objective, or the objective.
        model: The ``MultimodalModel`` it is bound to (run on the source modality only).
        batch: The inputs; the target modality need not be present.
        max_tokens: Most tokens generated per row.

    Returns:
        ``LongTensor[B, L]``, ``L <= max_tokens``: ids ending with ``[EOS]`` where it was emitted,
        then ``[PAD]``; rows without the source modality are all ``[PAD]``.

    Raises:
        ConfigError: If there is not exactly one captioning objective.
        ValueError: If ``max_tokens`` is not in ``[1, max_len - 1]``.
    """
    captioner = find_captioner(method_or_objective)
    source = captioner.source
    outputs = model(batch.select([source]))
    out = torch.zeros(batch.size, 0, dtype=torch.long, device=batch.ids.device)
    rows = batch.rows(source).to(out.device)
    if source not in outputs.tokens or not bool(rows.any()):
        return out
    context, padding = outputs.tokens[source], outputs.padding.get(source)
    keep = rows.to(context.device)
    ids = captioner.decode(context[keep], padding[keep] if padding is not None else None, max_tokens)
    out = torch.zeros(batch.size, ids.shape[1], dtype=torch.long, device=ids.device)
    return out.index_copy(0, keep.nonzero().squeeze(1), ids)


@dataclass
class CaptionScores:
    """Running sums of teacher-forced next-token predictions.

    Attributes:
        tokens: Valid target tokens seen.
        nll: Sum of their negative log-likelihoods (nats).
        correct: Targets that were the argmax.
    """

    tokens: int = 0
    nll: float = 0.0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        """Fraction of targets predicted by the argmax."""
        return self.correct / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        """``exp(nll / tokens)``."""
        return math.exp(self.nll / max(1, self.tokens))


@torch.no_grad()
def score_captions(captioner: Captioning, model: nn.Module, batches: Iterable[Batch]) -> CaptionScores:
    """Teacher-forced token accuracy and perplexity of the decoder on ``batches`` (eval mode is the caller's)."""
    scores = CaptionScores()
    for batch in batches:
        feats = captioner.features(model, batch, model(batch))
        if not feats:
            continue
        logits, targets = feats["logits"].float(), feats["targets"]
        scores.tokens += int(targets.numel())
        scores.nll += float(F.cross_entropy(logits, targets, reduction="sum"))
        scores.correct += int((logits.argmax(dim=-1) == targets).sum())
    return scores


def target_counts(batches: Iterable[Batch], modality: str, tokens: CaptionTokens) -> Tensor:
    """``LongTensor[V]``: how often each id is a next-token target (words and ``[EOS]``) in ``batches``."""
    counts = torch.zeros(tokens.vocab_size, dtype=torch.long)
    for batch in batches:
        if modality not in batch.data:
            continue
        rows = batch.rows(modality)
        pad = batch.padding.get(modality)
        _, targets, padding = teacher_forcing(
            batch.data[modality][rows], pad[rows] if pad is not None else None, tokens.bos, tokens.eos
        )
        counts += torch.bincount(targets[~padding].cpu(), minlength=tokens.vocab_size)
    return counts


def unigram_scores(train_counts: Tensor, test_counts: Tensor) -> CaptionScores:
    """The unigram baseline: every target predicted by the add-one-smoothed train frequencies.

    ``p(w) = (c_w + 1) / (sum c + V)``; its argmax is the most frequent train target.

    Args:
        train_counts: ``LongTensor[V]`` target counts of the training split.
        test_counts: ``LongTensor[V]`` target counts of the scored split.
    """
    train, test = train_counts.double(), test_counts.double()
    logp = torch.log((train + 1.0) / (train.sum() + train.numel()))
    best = int(train.argmax())
    return CaptionScores(int(test.sum()), float(-(test * logp).sum()), int(test[best]))


class CaptionDetokenizer:
    """Generated ids to text with a run's ``TextTokenizer``.

    Stops at ``[EOS]``, drops the specials that are never generated, keeps ``[UNK]``; WordPiece
    ``##`` continuations are glued to the previous piece, word-level tokens joined with spaces.
    (``TextTokenizer`` has no ``decode``; this reads the HF tokenizer back from its JSON.)

    Args:
        tokenizer: The tokenizer the run's target modality was encoded with.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokens = caption_tokens(tokenizer.vocab_size)
        self._hf = Tokenizer.from_str(tokenizer.to_json())
        if type(self._hf.model).__name__ == "WordPiece":
            self._hf.decoder = decoders.WordPiece()

    def __call__(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (up to the first ``[EOS]``)."""
        kept: list[int] = []
        for i in ids:
            if i == self.tokens.eos:
                break
            if i not in self.tokens.never_generated:
                kept.append(int(i))
        return str(self._hf.decode(kept, skip_special_tokens=False))
