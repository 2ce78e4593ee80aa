"""A schedule's horizon: the optimizer steps the run will take, as whichever of its limits ends it first allows.

Without ``model.optimizer.decay_steps`` the schedule decays to its floor at the run's last step.
The run ends at the first of ``trainer.max_steps`` (or the epochs it implies) and each
``loop.stop_at`` budget, converted into steps as training measures them:

- steps: the budget itself;
- samples or tokens: the budget divided by the samples or tokens an optimizer step has
  averaged so far (rounded up: the run stops after the step that reaches it);
- seconds: the steps done plus the seconds left times the step rate over the last
  ``xlab.loop.RATE_WINDOW`` steps (validation included, as the budget counts it).

The estimate is renewed before every optimizer step, so a time-budgeted run follows its measured
speed and trains its last step at the floor. A budget not yet measurable (no rate before the
second step) is left out until it is.
"""

import math

from lightning.pytorch import Trainer

from xlab.loop import LoopControl, Period, Progress
from xlab.models.schedule import WarmupDecay


def run_steps(max_steps: float, control: LoopControl | None) -> float | None:
    """The optimizer steps the run will take at the rates measured so far: the fewest any limit allows, with
    ``max_steps`` (inf: none) for the trainer's; None while no limit can be converted into steps."""
    limits = [max_steps] if math.isfinite(max_steps) else []
    if control is not None:
        limits += [steps for budget in control.budgets if (steps := budget_steps(budget, control)) is not None]
    return min(limits) if limits else None


def budget_steps(budget: Period, control: LoopControl) -> float | None:
    """The optimizer steps after which ``budget`` will be reached, or None while it cannot be estimated."""
    done: Progress = control.decided  # as of the start of the current step, that step's batch counted
    if budget.unit == "steps":
        return budget.amount
    if budget.unit == "seconds":
        rate = control.rate("steps")
        if not rate:
            return None
        return done.steps - 1 + max(1, math.ceil((budget.amount - done.seconds) * rate))
    if done.steps == 0:
        return None
    return math.ceil(budget.amount / (done.get(budget.unit) / done.steps))


class BudgetHorizon:
    """Keeps ``schedule.decay_steps`` at the last step of the run (``run_steps`` minus one), or of the
    ``share`` of the run's optimizer steps that the schedule's optimizer takes."""

    def __init__(self, schedule: WarmupDecay, max_steps: float, share: float = 1.0):
        self.schedule = schedule
        self.max_steps = max_steps
        self.share = share

    def update(self, trainer: Trainer) -> None:
        steps = run_steps(self.max_steps, LoopControl.of(trainer))
        if steps is not None:
            self.schedule.decay_steps = max(0.0, steps * self.share - 1)

    @staticmethod
    def has_limit(max_steps: float, trainer: Trainer) -> bool:
        """Whether the run ends at all: a finite ``max_steps`` or a ``loop.stop_at`` budget."""
        control = LoopControl.of(trainer)
        return math.isfinite(max_steps) or bool(control is not None and control.budgets)
