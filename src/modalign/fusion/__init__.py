"""Fusion modules (kind ``fusion``); importing this package registers them.

Only the fusion-free two-tower identity exists so far; cross-attention, bottleneck, early and
late fusion plug in here with the same ``Fusion.forward(dict[str, EncoderOutput])`` contract.
"""

from modalign.fusion.two_tower import NoFusion

__all__ = ["NoFusion"]
