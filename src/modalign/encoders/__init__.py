"""Encoders, one tower per modality kind; importing this package registers them all.

Registered names: ``image_cnn``, ``image_vit``, ``audio_cnn``, ``audio_transformer``,
``text_transformer``, ``text_bow``, ``series_conv``, ``series_transformer``, ``vector_mlp``, and
the pretrained towers of the ``stitch`` extra (imported lazily when built): ``text_minilm``,
``image_efficientnet_lite0``, ``audio_resemblyzer``.
"""

from modalign.encoders.audio import AudioCNN, AudioTransformer
from modalign.encoders.image import ImageCNN, ImageViT
from modalign.encoders.series import SeriesConv, SeriesTransformer
from modalign.encoders.stitch import EfficientNetLite0Image, MiniLMText, ResemblyzerAudio
from modalign.encoders.text import TextBoW, TextTransformer
from modalign.encoders.vector import VectorMLP

__all__ = [
    "AudioCNN",
    "AudioTransformer",
    "EfficientNetLite0Image",
    "ImageCNN",
    "ImageViT",
    "MiniLMText",
    "ResemblyzerAudio",
    "SeriesConv",
    "SeriesTransformer",
    "TextBoW",
    "TextTransformer",
    "VectorMLP",
]
