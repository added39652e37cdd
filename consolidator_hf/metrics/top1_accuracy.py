"""Top-1 accuracy as an ``evaluate.Metric`` that needs no Hub download.

Loading the Hub's ``accuracy`` metric through ``evaluate`` fetches a script from the Hub; this class is defined in the package,
so it works with ``HF_HUB_OFFLINE=1``. The module imports nothing from ``consolidator_hf`` so that
``evaluate.load("<path to this file>")`` can load it too.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predicted class ids equal to the reference class ids."
_INPUTS = """
Args:
    predictions: predicted class ids (int), one per example (e.g. ``logits.argmax(-1)``).
    references: true class ids (int), one per example.
Returns:
    {"accuracy": float in [0, 1]}
"""
_CITATION = ""


class Top1Accuracy(evaluate.Metric):
    """``Top1Accuracy().compute(predictions=[...], references=[...]) -> {"accuracy": float}``.

    Supports ``add_batch`` accumulation like every ``evaluate`` metric. Kept in memory by default
    (``keep_in_memory=True``): no cache files, so concurrent processes (one per rank) never share one.
    """

    def __init__(self, *args, keep_in_memory: bool = True, **kwargs):
        super().__init__(*args, keep_in_memory=keep_in_memory, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("Top1Accuracy: no predictions to score")
        return {"accuracy": float((predictions == references).mean())}
