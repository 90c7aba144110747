"""Gradual unfreezing (ULMFiT): train the top layer first, then release one more layer at a time, top down.

The trainer builds its optimizer before training begins, while every parameter still requires
a gradient, so every parameter has its place in the optimizer. The callback then switches
gradients off for all but the top unit when training begins, and back on unit by unit, at
steps spread evenly over the first ``fraction`` of training. A parameter without a gradient is
skipped by the optimizer (its Adam moments start when it is released).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainerControl, TrainerState, TrainingArguments

UNFREEZE_FRACTION = 0.5


def unfreeze_steps(num_units: int, max_steps: int, fraction: float = UNFREEZE_FRACTION) -> list[int]:
    """The step at which each unit (top first) starts training: unit 0 at step 0, the last by ``fraction``."""
    span = fraction * max_steps
    return [round(i * span / num_units) for i in range(num_units)]


class GradualUnfreezing(TrainerCallback):
    """Release ``units`` (ordered top layer first) one at a time over the first ``fraction`` of the steps."""

    def __init__(self, units: list[nn.Module], fraction: float = UNFREEZE_FRACTION) -> None:
        self.units = units
        self.fraction = fraction
        self.starts: list[int] = []
        self.released = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.starts = unfreeze_steps(len(self.units), state.max_steps, self.fraction)
        for unit in self.units:
            unit.requires_grad_(False)
        self.released = 0
        self._release(state.global_step)  # a resumed run releases what it had already released

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._release(state.global_step)

    def _release(self, step: int) -> None:
        while self.released < len(self.units) and self.starts[self.released] <= step:
            self.units[self.released].requires_grad_(True)
            self.released += 1
