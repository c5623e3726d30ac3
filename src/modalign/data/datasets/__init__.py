"""Built-in datasets; importing this package registers them (kind ``dataset``).

Every dataset constructor takes the framework-provided arguments ``root`` (data root or
``None`` for ``$MODALIGN_DATA``), ``split`` (``"train"``/``"test"``), ``seed``, ``augment``
(``None`` = on for the train split) and ``artifacts`` (fitted state from ``artifacts()`` of the
train split, e.g. a tokenizer), followed by dataset-specific keyword arguments.
"""

from modalign.data.datasets import av_digits, basicmotions, emoji, emoji_multilingual, manifest

__all__ = ["av_digits", "basicmotions", "emoji", "emoji_multilingual", "manifest"]
