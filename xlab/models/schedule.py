"""Learning-rate schedule: linear warm-up, then cosine decay to a floor that is really reached."""

import math
from dataclasses import dataclass


@dataclass
class WarmupCosine:
    """Multiplier of the peak learning rate at an optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Rises linearly over ``warmup_steps`` to 1, follows a half cosine down to ``floor`` at
    ``decay_steps`` (counted from step 0), and stays at ``floor`` from then on.
    """

    warmup_steps: int
    decay_steps: int
    floor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
