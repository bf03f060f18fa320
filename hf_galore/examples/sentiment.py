"""Shared pieces of the sentiment demo and recipes: tokenizing `(text, label)` examples, accuracy and F1.

`datasets`, `numpy` and scikit-learn are imported when called (they are in the `demo` extra).
"""

from __future__ import annotations

from typing import Any


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy and binary F1 (positive class) with scikit-learn."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, zero_division=0)),
    }


def tokenize_examples(examples: list[tuple[str, int]], tokenizer: Any, max_length: int):
    """A `datasets.Dataset` of `examples` (`(text, label)` pairs) tokenized with `tokenizer`, truncated."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": [t for t, _ in examples], "label": [y for _, y in examples]})
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="Tokenizing",
    )
