"""Accuracy: the fraction of predictions equal to their reference.

Kept in this repository and loaded by path, so nothing is fetched from the Hub:

    metric = evaluate.load("metrics/accuracy")
    metric.compute(predictions=[0, 2, 1], references=[0, 1, 1])   # {"accuracy": 0.666...}
"""

import datasets
import evaluate

_DESCRIPTION = "The fraction of predictions (class indices) equal to their reference, e.g. multiple-choice answers."
_KWARGS = """
Args:
    predictions (list of int): predicted class (for multiple choice: the index of the chosen answer).
    references (list of int): the correct class.
Returns:
    accuracy (float): correct / total, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy of no examples is undefined")
        correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        return {"accuracy": correct / len(references)}
