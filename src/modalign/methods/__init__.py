"""Methods: ``Method`` (a model plus weighted objectives) and the named presets (kind ``method``).

Importing this package registers the presets.
"""

from modalign.methods.base import Method, MultimodalModel
from modalign.methods.captioning import coca
from modalign.methods.clustering import mcn, selavi, xdc
from modalign.methods.hybrid import albef, flava
from modalign.methods.masked import data2vec, mlm, multimae
from modalign.methods.matching import avc, itm
from modalign.methods.presets import clip, composite, entry_labels, siglip

__all__ = [
    "Method",
    "MultimodalModel",
    "albef",
    "avc",
    "clip",
    "coca",
    "composite",
    "data2vec",
    "entry_labels",
    "flava",
    "itm",
    "mcn",
    "mlm",
    "multimae",
    "selavi",
    "siglip",
    "xdc",
]
