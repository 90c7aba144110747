"""The validation evaluator handed to the trainer (imports sentence-transformers, so kept out of validation.py).

It scores with :func:`training.evaluate.evaluate` rather than one ``InformationRetrievalEvaluator``
per dim: the corpus is encoded once at full dimension and every dim derived from it, and the
figures are computed exactly like the published before/after ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from core.models import SentenceTransformerEncoder
from training.adaptor import TOLERANCE
from training.evaluate import evaluate
from training.validation import RULE_KEY, VALIDATION_SPLIT, ValidationSet, metric_key, rule_objective

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class MatryoshkaValidationEvaluator(BaseEvaluator):
    """A sentence-transformers evaluator: every metric at every dim, keyed ``dim_{dim}_{metric}``.

    The trainer prefixes ``eval_`` and logs the dict, so the history lands in ``log_history``
    (and in TensorBoard when enabled); ``primary_metric`` drives best-checkpoint selection.
    """

    def __init__(
        self,
        validation: ValidationSet,
        dims: list[int],
        metric: str,
        dim: int | None,
        batch_size: int,
        tolerance: float = TOLERANCE,
    ) -> None:
        super().__init__()
        self.validation = validation
        self.dims = dims
        self.metric = metric
        self.select_dim = dim  # None: the mean gain over the dims
        self.tolerance = tolerance
        self.batch_size = batch_size
        self.baseline: dict[int, float] | None = None  # the input model's metric per dim (set_baseline)
        self.primary_metric = RULE_KEY

    def scores(self, model: SentenceTransformer) -> dict[int, dict[str, float]]:
        encoder = SentenceTransformerEncoder(model, "validation", self.batch_size, progress=False)
        return evaluate(encoder, self.validation.dataset, VALIDATION_SPLIT, self.dims).by_dim

    def set_baseline(self, model: SentenceTransformer) -> dict[int, float]:
        """Score the input model, which every checkpoint is then judged against."""
        self.baseline = {dim: values[self.metric] for dim, values in self.scores(model).items()}
        return self.baseline

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        by_dim = self.scores(model)
        metrics = {metric_key(dim, name): value for dim, values in by_dim.items() for name, value in values.items()}
        metrics[RULE_KEY] = rule_objective({d: v[self.metric] for d, v in by_dim.items()}, self.baseline or {},
                                           self.tolerance, self.select_dim)  # fmt: skip
        return metrics

    @property
    def description(self) -> str:
        return "Matryoshka validation"

    def get_config_dict(self) -> dict[str, Any]:
        return {"dims": self.dims}

    def store_metrics_in_model_card_data(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to record: the training report holds the validation history."""
