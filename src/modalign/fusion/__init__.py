"""Fusion modules (kind ``fusion``); importing this package registers them.

The contract is ``modalign.core.modules.Fusion``: built with each modality's token width, it
joins the tokens of the modalities present in each row into one ``EncoderOutput``.

* ``none``: two towers, no joint representation (``two_tower``);
* late fusion of pooled vectors: ``concat``, ``gated`` (GMU), ``tensor`` (low-rank tensor
  fusion) (``late``);
* token-level fusion with attention: ``early`` (single-stream transformer, VisualBERT/UNITER)
  (``early``); ``shared`` (one modality-agnostic transformer per modality, VATT) (``shared``);
  ``coattention`` (dual-stream co-attention, ViLBERT/LXMERT) and ``cross_attention`` (ALBEF's
  fusion encoder) (``attention``); ``bottleneck`` (attention bottlenecks, MBT) (``bottleneck``).
"""

from modalign.fusion.attention import CoAttentionFusion, CrossAttentionFusion
from modalign.fusion.bottleneck import BottleneckFusion
from modalign.fusion.early import EarlyFusion
from modalign.fusion.late import ConcatFusion, GatedFusion, LowRankTensorFusion
from modalign.fusion.shared import SharedFusion
from modalign.fusion.two_tower import NoFusion

__all__ = [
    "BottleneckFusion",
    "CoAttentionFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "EarlyFusion",
    "GatedFusion",
    "LowRankTensorFusion",
    "NoFusion",
    "SharedFusion",
]
