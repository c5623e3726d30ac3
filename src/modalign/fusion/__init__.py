"""Fusion modules (kind ``fusion``); importing this package registers them.

The contract is ``modalign.core.modules.Fusion``: built with each modality's token width, it
joins the tokens of the modalities present in each row into one ``EncoderOutput``.

* ``none``: two towers, no joint representation (``two_tower``);
* late fusion of pooled vectors: ``concat``, ``gated`` (GMU), ``tensor`` (low-rank tensor
  fusion) (``late``).
"""

from modalign.fusion.late import ConcatFusion, GatedFusion, LowRankTensorFusion
from modalign.fusion.two_tower import NoFusion

__all__ = ["ConcatFusion", "GatedFusion", "LowRankTensorFusion", "NoFusion"]
