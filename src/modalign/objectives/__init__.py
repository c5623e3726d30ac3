"""Losses: each a plain function on tensors plus a thin registered ``Objective`` module.

Registered names: ``infonce`` (CLIP), ``sigmoid`` (SigLIP).
"""

from modalign.objectives.contrastive import InfoNCE, infonce_loss
from modalign.objectives.sigmoid import SigmoidLoss, sigmoid_loss

__all__ = ["InfoNCE", "SigmoidLoss", "infonce_loss", "sigmoid_loss"]
