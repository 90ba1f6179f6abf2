"""Evaluation of face embeddings: similarities, verification/identification metrics, evaluator.

- :mod:`femb.evaluation.similarity`: ``cos`` and ``l2`` scores (higher = more similar).
- :mod:`femb.evaluation.metrics`: exact ROC, AUC, EER, TAR@FAR, k-fold accuracy, CMC.
- :class:`VerificationEvaluator`: embeddings -> flat metrics dict, used by the trainer.
"""

from femb.evaluation.evaluator import (
    VerificationEvaluator,
    VerificationResult,
    far_key,
    stratified_folds,
)
from femb.evaluation.metrics import (
    EqualErrorRate,
    GenuineImpostorScores,
    IdentificationSplit,
    KFoldAccuracy,
    RocCurve,
    TarAtFar,
    cmc_curve,
    consecutive_folds,
    equal_error_rate,
    identification_ranks,
    identification_split,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from femb.evaluation.similarity import (
    SIMILARITIES,
    Similarity,
    cosine_similarity,
    cosine_similarity_matrix,
    get_similarity,
    l2_normalize,
    l2_similarity,
    l2_similarity_matrix,
)

__all__ = [
    "SIMILARITIES",
    "EqualErrorRate",
    "GenuineImpostorScores",
    "IdentificationSplit",
    "KFoldAccuracy",
    "RocCurve",
    "Similarity",
    "TarAtFar",
    "VerificationEvaluator",
    "VerificationResult",
    "cmc_curve",
    "consecutive_folds",
    "cosine_similarity",
    "cosine_similarity_matrix",
    "equal_error_rate",
    "far_key",
    "get_similarity",
    "identification_ranks",
    "identification_split",
    "kfold_accuracy",
    "l2_normalize",
    "l2_similarity",
    "l2_similarity_matrix",
    "roc_auc",
    "roc_curve",
    "stratified_folds",
    "tar_at_far",
]
