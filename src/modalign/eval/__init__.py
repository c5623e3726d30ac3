"""Evaluation of embeddings read through the ``Embedder`` protocol only.

Retrieval R@K and ranks, class-match p@1/mAP, prototype zero-shot, linear probe, kNN, k-means
clustering NMI/ARI, modality gap, alignment/uniformity, plots and a flat metrics report. Every
similarity computation works in ``[chunk_size, gallery_chunk_size]`` blocks with running maxima,
counts or top-k (``modalign.eval.blocks``), so memory is flat in the gallery size.
"""

from modalign.eval.blocks import topk_neighbours
from modalign.eval.classification import (
    class_prototypes,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    zero_shot_accuracy,
)
from modalign.eval.clustering import cluster_scores, kmeans_assignments, kmeans_scores
from modalign.eval.embed import EmbeddingSet, EvalInputError, embed_loader
from modalign.eval.gap import alignment_uniformity, modality_gap
from modalign.eval.plots import plot_loss_curve, plot_projection, plot_similarity_matrix
from modalign.eval.report import evaluate_embeddings, format_table, own_cluster_metrics, write_eval_json
from modalign.eval.retrieval import class_match_metrics, first_positive_ranks, retrieval_metrics

__all__ = [
    "EmbeddingSet",
    "EvalInputError",
    "alignment_uniformity",
    "class_match_metrics",
    "class_prototypes",
    "cluster_scores",
    "embed_loader",
    "evaluate_embeddings",
    "first_positive_ranks",
    "format_table",
    "kmeans_assignments",
    "kmeans_scores",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "modality_gap",
    "own_cluster_metrics",
    "plot_loss_curve",
    "plot_projection",
    "plot_similarity_matrix",
    "retrieval_metrics",
    "topk_neighbours",
    "write_eval_json",
    "zero_shot_accuracy",
]
