"""Species probe: what the cached features carry beyond masks, in seconds.

A logistic regression on mean-pooled patch features, trained and scored on the same split as the
decoder. With one species (or one species in train) there is nothing to probe, and it says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fishseg.formats.cache import FeatureCache

POOL_CHUNK = 256  # images whose feature grids are read at once


def pooled_features(cache: FeatureCache, indices: np.ndarray) -> np.ndarray:
    """N×D float32 means of each image's patch grid, read a chunk at a time."""
    return np.concatenate([cache.features(indices[start:start + POOL_CHUNK]).astype(np.float32).mean(axis=(1, 2))
                           for start in range(0, len(indices), POOL_CHUNK)])


def run_probe(cache: FeatureCache, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    """Fit on ``train_idx``, score on ``val_idx``: accuracy and the confusion matrix (rows: true species)."""
    labels = cache.class_index
    if len(np.unique(labels[train_idx])) < 2:
        return {"skipped": "fewer than two species in the training split"}
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(pooled_features(cache, train_idx), labels[train_idx])
    predicted = probe.predict(pooled_features(cache, val_idx))
    return {
        "accuracy": float(accuracy_score(labels[val_idx], predicted)),
        "n_train": len(train_idx), "n_val": len(val_idx), "classes": cache.class_names,
        "confusion": confusion_matrix(labels[val_idx], predicted, labels=range(len(cache.class_names))).tolist(),
    }
