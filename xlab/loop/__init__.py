"""Loop control as configuration: periods and budgets in steps, samples, tokens or seconds.

Lightning's loop does the training. ``LoopControl``, one callback, counts what every optimizer step adds
(samples, tokens, wall-clock time) and from those counts tells Lightning when to validate and log, saves
``last.ckpt``, calls ``Periodic`` callbacks such as ``SampleText``, and stops the run at a budget. It also
shows tokens per second, the time left and a running loss in the progress bar, and writes every logged
metric to ``metrics.csv`` beside the TensorBoard events.

Periods and budgets are strings: ``"500 steps"``, ``"64k samples"``, ``"1M tokens"``, ``"90 s"``,
``"30 min"``, ``"2h"``.

- ``periods``: ``Progress``, ``Period`` and their grammar.
- ``control``: ``LoopControl``, ``Periodic`` and what a batch counts.
- ``progress_bar``: ``LoopFigures`` and Lightning's two bars with them.
- ``metrics_csv``: ``MetricsCSV``, the logger behind ``metrics.csv``.
- ``checkpoint_path``: ``last_checkpoint_path``, where a run's ``last.ckpt`` is.
"""

from xlab.loop.checkpoint_path import LAST_CHECKPOINT, last_checkpoint_path
from xlab.loop.control import (
    NEVER,
    RATE_WINDOW,
    BatchCounts,
    LoopControl,
    Periodic,
    count_batch,
    samples_in_batch,
    tokens_in_batch,
)
from xlab.loop.metrics_csv import MetricsCSV
from xlab.loop.periods import (
    PERIOD_HELP,
    PERIOD_SYNTAX,
    SCALES,
    UNITS,
    Period,
    Progress,
    bad_period,
    format_duration,
    parse_optional,
)
from xlab.loop.progress_bar import (
    LOOP_PROGRESS_BARS,
    LOSS_WINDOW,
    LoopFigures,
    LoopRichProgressBar,
    LoopTQDMProgressBar,
)

__all__ = [
    "LAST_CHECKPOINT",
    "LOOP_PROGRESS_BARS",
    "LOSS_WINDOW",
    "NEVER",
    "PERIOD_HELP",
    "PERIOD_SYNTAX",
    "RATE_WINDOW",
    "SCALES",
    "UNITS",
    "BatchCounts",
    "LoopControl",
    "LoopFigures",
    "LoopRichProgressBar",
    "LoopTQDMProgressBar",
    "MetricsCSV",
    "Period",
    "Periodic",
    "Progress",
    "bad_period",
    "count_batch",
    "format_duration",
    "last_checkpoint_path",
    "parse_optional",
    "samples_in_batch",
    "tokens_in_batch",
]
