"""Encoders, one tower per modality kind; importing this package registers them all.

Registered names: ``image_cnn``, ``image_vit``, ``audio_cnn``, ``audio_transformer``,
``text_transformer``, ``text_bow``, ``series_conv``, ``series_transformer``, ``vector_mlp``.
"""

from modalign.encoders.audio import AudioCNN, AudioTransformer
from modalign.encoders.image import ImageCNN, ImageViT
from modalign.encoders.series import SeriesConv, SeriesTransformer
from modalign.encoders.text import TextBoW, TextTransformer
from modalign.encoders.vector import VectorMLP

__all__ = [
    "AudioCNN",
    "AudioTransformer",
    "ImageCNN",
    "ImageViT",
    "SeriesConv",
    "SeriesTransformer",
    "TextBoW",
    "TextTransformer",
    "VectorMLP",
]
