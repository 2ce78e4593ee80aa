"""The translation LightningModule: label-smoothed loss, token metrics, and decoded exact match, BLEU and chrF."""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from xlab.data.tokenizer import PAD_ID
from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.losses import seq2seq_loss
from xlab.models.metrics import LMMetrics, corpus_scores, token_accuracy, token_statistics
from xlab.models.optimizer import OptimizerConfig
from xlab.models.sharding import whole_weights
from xlab.models.training import TrainingModule
from xlab.models.transforms import Transform

Decode = Callable[[nn.Module, list[list[int]], int, int], list[list[int]]]
"""How a Translator decodes: (network, source token ids, num_beams, max_new_tokens) -> best target ids per source."""


class Translator(TrainingModule):
    """An encoder-decoder transformer trained on sentence pairs.

    ``implementation``: ``xlab`` (layers.py, KV-cached decoding) or ``torch``
    (``torch.nn.Transformer``, the reference). Validation and test decode every source
    (greedy, or beam search with ``num_beams``) and score the translations against the
    references; ``examples`` of them go to TensorBoard's text tab. The decoding is handed in
    (``use_decoder``; the callback ``xlab.callbacks.EngineDecoding`` does it), so that the
    models do not import the engine, which decodes them through its Protocols.
    """

    family = "translator"

    def __init__(
        self,
        arch: TransformerConfig,
        optimizer: OptimizerConfig = OptimizerConfig(),
        implementation: Literal["xlab", "torch"] = "xlab",
        transforms: Sequence[Transform] = (),
        label_smoothing: float = 0.1,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        examples: int = 5,
        compile: bool = False,
    ):
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        super().__init__(arch, optimizer, transforms, implementation, compile)
        self.label_smoothing = label_smoothing
        for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
            if value < 1:
                raise UserError(f"model.{name} must be at least 1, got {value}")
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.decoding: Decode | None = None
        self.examples = examples
        self.metrics = nn.ModuleDict({stage: LMMetrics() for stage in ("val", "test")})
        self.outputs: list[tuple[str, str, str]] = []

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.network(batch["source"], batch["target_input"], batch["source_padding"], batch["target_padding"])

    def tokens_in_batch(self, batch: dict[str, Tensor]) -> int:
        """Target tokens (padding excluded) this process trains on in ``batch``."""
        return int((batch["target"] != PAD_ID).sum())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = seq2seq_loss(logits, batch["target"], self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        if self.logs_this_step():
            self.log("train/accuracy", token_accuracy(logits, batch["target"], ignore_index=PAD_ID))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: dict[str, Any]) -> None:
        stats = token_statistics(self(batch), batch["target"], ignore_index=PAD_ID)
        self.metrics[stage].update(stats, batch["target_bytes"].sum())
        translations = self.translate_batch(batch)
        self.outputs.extend(zip(batch["source_text"], translations, batch["reference"]))

    def use_decoder(self, decode: Decode) -> None:
        """Decode the sources of validation, test and predict with ``decode``."""
        self.decoding = decode

    def translate_batch(self, batch: dict[str, Any]) -> list[str]:
        """The decoded translation of every source in ``batch``."""
        if self.decoding is None:
            raise UserError(
                f"{type(self).__name__} needs xlab.callbacks.EngineDecoding among the trainer's callbacks to decode"
            )
        sources = [row[~padding].tolist() for row, padding in zip(batch["source"], batch["source_padding"])]
        tokenizer = self.trainer.datamodule.tokenizer
        with whole_weights(self.model):  # each process decodes for as many steps as its own sources need
            targets = self.decoding(self.model, sources, self.num_beams, self.max_new_tokens)
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in targets]

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        outputs = gather_outputs(self.trainer, self.outputs)
        self.outputs = []
        _, hypotheses, references = zip(*outputs) if outputs else ((), (), ())
        values.update(corpus_scores(list(hypotheses), list(references)))
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=stage == "val")
        write_table(self, f"{stage}/translations", ("source", "translation", "reference"), outputs[: self.examples])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """The translation of every source of the predict split, beside its reference."""
        translations = self.translate_batch(batch)
        return [
            {"source": s, "translation": t, "reference": r}
            for s, t, r in zip(batch["source_text"], translations, batch["reference"])
        ]


def gather_outputs(trainer: Trainer, outputs: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Every process's (source, translation, reference) triples, in the same order on every process."""
    if trainer.world_size == 1 or not dist.is_initialized():
        return outputs
    gathered: list[list[tuple[str, str, str]]] = [[] for _ in range(trainer.world_size)]
    dist.all_gather_object(gathered, outputs)
    return [triple for part in gathered for triple in part]


def write_table(
    module: LightningModule,
    tag: str,
    columns: Sequence[str],
    rows: list[tuple[str, str, str]],
    same: str = "exact",
) -> None:
    """A markdown table of (source, output, reference) rows in TensorBoard's text tab, and a column ``same``
    saying whether the output equals the third column."""
    experiment = getattr(module.logger, "experiment", None)
    if not rows or not module.trainer.is_global_zero or not hasattr(experiment, "add_text"):
        return
    lines = [f"| {s} | {t} | {r} | {'yes' if t == r else 'no'} |" for s, t, r in rows]
    header = f"| {' | '.join(columns)} | {same} |"
    table = "\n".join([header, "|---|---|---|---|", *lines])
    experiment.add_text(tag, table, module.global_step)
