"""Top-k accuracy of a classifier over a dataset."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["evaluate_classifier", "topk_correct"]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each label is among the `k` highest logits of its row.

    Ties are broken in favour of the lower class index (a stable sort), so
    the result does not depend on the backend.

    Args:
        logits: `(N, classes)` scores.
        labels: `(N,)` integer labels.
        k: 1 <= k <= classes.

    Returns:
        A boolean array of shape `(N,)`.

    Example:

    >>> topk_correct(np.array([[0.1, 0.9, 0.0]]), np.array([0]), 2)
    array([ True])
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be (N, classes) with N = len(labels); received "
            f"logits {logits.shape} and labels {labels.shape}."
        )
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], received k={k}.")
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def evaluate_classifier(
    model,
    batches: Iterable,
    ks: Sequence[int] = (1, 5),
    num_classes: int | None = None,
    return_correct: bool = False,
) -> dict:
    """Top-k accuracies of `model` over `(images, labels)` batches.

    Args:
        model: a Keras model mapping images to logits.
        batches: an iterable of `(images, labels)` numpy batches (e.g.
            `dataset.as_numpy_iterator()`), or a `tf.data.Dataset`.
        ks: which top-k to report; k larger than the number of classes is
            skipped.
        num_classes: the number of classes (default: the logits' width).
        return_correct: also return `"correct"`, whether each example's top-1
            is right (a boolean array in the batches' order), for paired
            comparisons of models on the same images
            (`evaluation.paired.paired_difference`).

    Returns:
        `{"top1": float, "top5": float, ..., "examples": int}` (and
        `"correct"` when asked).
    """
    if hasattr(batches, "as_numpy_iterator"):
        batches = batches.as_numpy_iterator()
    correct: dict[int, int] = {}
    per_example = []
    seen = 0
    for images, labels in batches:
        logits = np.asarray(model.predict_on_batch(images))
        classes = num_classes or logits.shape[1]
        for k in ks:
            if k <= classes:
                correct[k] = correct.get(k, 0) + int(
                    topk_correct(logits, labels, k).sum()
                )
        if return_correct:
            per_example.append(topk_correct(logits, labels, 1))
        seen += len(labels)
    if seen == 0:
        raise ValueError("The dataset is empty: nothing to evaluate.")
    result: dict = {f"top{k}": correct[k] / seen for k in sorted(correct)}
    result["examples"] = seen
    if return_correct:
        result["correct"] = np.concatenate(per_example)
    return result
