"""Losses: each a plain function on tensors plus a thin registered ``Objective`` module.

Registered names: ``infonce`` (CLIP), ``sigmoid`` (SigLIP), ``multiview`` (CMC/ImageBind),
``moco`` (momentum contrast with queues), ``dcl``, ``vicreg``, ``barlow``, ``gmc`` (trains a
fusion module), the unaligned-data losses (``milnce``, ``soft_infonce``, ``weighted_infonce``,
``ncr_infonce``, ``ncr_rematch``, ``crossfit_infonce``, the bounded ``complementary_infonce``
and ``rince``, ``window_milnce``, ``filip``, ``ot_tokens``, ``soft_dtw``, ``pseudo_pairs``),
within-modality instance discrimination (``unimodal_infonce``), and the families added by the modules imported below.
"""

from modalign.objectives.captioning import Captioning, caption_loss, greedy_decode
from modalign.objectives.clustering import XDC, MCNCluster, SeLaVi, swapped_prediction_loss, xdc_loss
from modalign.objectives.contrastive import InfoNCE, infonce_loss
from modalign.objectives.crossfit import CrossFitInfoNCE
from modalign.objectives.data2vec import Data2Vec, data2vec_targets, ema_update
from modalign.objectives.decoupled import DCL, dcl_loss
from modalign.objectives.fused import GMC, nt_xent_loss
from modalign.objectives.masked import MultiMAE, masked_regression_loss, masked_token_loss, random_mask
from modalign.objectives.masked_conditional import MaskedConditional
from modalign.objectives.matching import AudioVisualCorrespondence, ImageTextMatching, avc_loss, itm_loss
from modalign.objectives.momentum import MoCo, queue_infonce_loss
from modalign.objectives.multiview import MultiView, multiview_pairs
from modalign.objectives.noisy_pairs import NCRInfoNCE, split_pair_losses
from modalign.objectives.noncontrastive import BarlowTwins, VICReg, barlow_twins_loss, vicreg_loss
from modalign.objectives.pseudo_pairs import PseudoPairs, mine_mnn, mine_ot, pseudo_pair_loss
from modalign.objectives.rematch import NCRRematch
from modalign.objectives.robust import RINCE, ComplementaryInfoNCE, complementary_infonce_loss, rince_loss
from modalign.objectives.sigmoid import SigmoidLoss, sigmoid_loss
from modalign.objectives.token_alignment import (
    FILIP,
    OTTokens,
    SoftDTW,
    filip_loss,
    ot_token_loss,
    ot_token_plan,
    soft_dtw_loss,
)
from modalign.objectives.unaligned import (
    MILNCE,
    SoftInfoNCE,
    WeightedInfoNCE,
    agreement_weights,
    milnce_loss,
    soft_infonce_loss,
    weighted_infonce_loss,
)
from modalign.objectives.unimodal import UnimodalInfoNCE, unimodal_infonce_loss
from modalign.objectives.window_milnce import WindowMILNCE, window_milnce_loss

__all__ = [
    "DCL",
    "FILIP",
    "GMC",
    "MILNCE",
    "RINCE",
    "XDC",
    "AudioVisualCorrespondence",
    "BarlowTwins",
    "Captioning",
    "ComplementaryInfoNCE",
    "CrossFitInfoNCE",
    "Data2Vec",
    "ImageTextMatching",
    "InfoNCE",
    "MCNCluster",
    "MaskedConditional",
    "MoCo",
    "MultiMAE",
    "MultiView",
    "NCRInfoNCE",
    "NCRRematch",
    "OTTokens",
    "PseudoPairs",
    "SeLaVi",
    "SigmoidLoss",
    "SoftDTW",
    "SoftInfoNCE",
    "UnimodalInfoNCE",
    "VICReg",
    "WeightedInfoNCE",
    "WindowMILNCE",
    "agreement_weights",
    "avc_loss",
    "barlow_twins_loss",
    "caption_loss",
    "complementary_infonce_loss",
    "data2vec_targets",
    "dcl_loss",
    "ema_update",
    "filip_loss",
    "greedy_decode",
    "infonce_loss",
    "itm_loss",
    "masked_regression_loss",
    "masked_token_loss",
    "milnce_loss",
    "mine_mnn",
    "mine_ot",
    "multiview_pairs",
    "nt_xent_loss",
    "ot_token_loss",
    "ot_token_plan",
    "pseudo_pair_loss",
    "queue_infonce_loss",
    "random_mask",
    "rince_loss",
    "sigmoid_loss",
    "soft_dtw_loss",
    "soft_infonce_loss",
    "split_pair_losses",
    "swapped_prediction_loss",
    "unimodal_infonce_loss",
    "vicreg_loss",
    "weighted_infonce_loss",
    "window_milnce_loss",
    "xdc_loss",
]
