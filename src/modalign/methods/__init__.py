"""Named methods (kind ``method``): a model plus objectives behind ``training_step``.

Importing this package registers them.
"""

from modalign.methods.base import Method, MultimodalModel
from modalign.methods.contrastive import ContrastiveMethod, clip, siglip

__all__ = ["ContrastiveMethod", "Method", "MultimodalModel", "clip", "siglip"]
