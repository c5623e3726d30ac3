"""Methods: ``Method`` (a model plus weighted objectives) and the named presets (kind ``method``).

Importing this package registers the presets.
"""

from modalign.methods.base import Method, MultimodalModel
from modalign.methods.presets import clip, composite, entry_labels, siglip

__all__ = ["Method", "MultimodalModel", "clip", "composite", "entry_labels", "siglip"]
