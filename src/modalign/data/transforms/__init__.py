"""Per-modality transforms: image, audio (log-mel), text (WordPiece or word tokens), series.

Each turns one raw value into the tensor a dataset yields (see ``modalign.data.base``);
random augmentation draws from the global torch RNG.
"""

from modalign.data.transforms.audio import AudioTransform, LogMel, load_audio, mel_filterbank
from modalign.data.transforms.image import ImageTransform, load_image
from modalign.data.transforms.series import SeriesTransform, draw_offsets, offset_crop_windows, paired_crop_window
from modalign.data.transforms.text import TextTokenizer, TextTransform

__all__ = [
    "AudioTransform",
    "ImageTransform",
    "LogMel",
    "SeriesTransform",
    "TextTokenizer",
    "TextTransform",
    "draw_offsets",
    "load_audio",
    "load_image",
    "mel_filterbank",
    "offset_crop_windows",
    "paired_crop_window",
]
