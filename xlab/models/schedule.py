"""Learning-rate schedules: linear warm-up, then cosine or trapezoid decay to a floor that is really reached."""

import math
from dataclasses import dataclass
from typing import Literal

ScheduleShape = Literal["cosine", "trapezoid"]


@dataclass
class WarmupDecay:
    """Multiplier of the peak learning rate at an optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Rises linearly over ``warmup_steps`` to 1, then comes down to ``floor`` at ``decay_steps``
    (counted from step 0) and stays there: ``cosine`` along a half cosine; ``trapezoid`` holds 1,
    then falls linearly over the last ``decay_fraction`` of the steps up to ``decay_steps`` (never
    before warm-up ends). ``decay_steps`` may move during a run (``xlab.models.horizon``); LambdaLR
    saves this object's fields in checkpoints, so a resumed run starts from the horizon it had.
    """

    warmup_steps: int
    decay_steps: float
    floor: float
    shape: ScheduleShape = "cosine"
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = self.warmup_steps
        if self.shape == "trapezoid":
            start = max(start, self.decay_steps * (1.0 - self.decay_fraction))
            if step < start:
                return 1.0
        progress = min(1.0, (step - start) / max(1.0, self.decay_steps - start))
        remaining = 1.0 - progress if self.shape == "trapezoid" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (1.0 - self.floor) * remaining
