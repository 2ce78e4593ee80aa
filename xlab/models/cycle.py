"""The cycle-consistent translator: two directions that train each other by back-translation.

Each training step updates each direction X->Y once, in turn. A batch of real Y text is
translated into X by the other direction, in eval mode and without gradients, through the
generation engine (``SyntheticSources`` says how); X->Y then learns to give back the real Y
from that synthetic X, with padding counting for nothing in the loss. Paired examples, a
denoising loss (shared topology) and a paired-only warm-up mix in by ``Mixing``. Unlike the
translator, this module calls the engine itself: generating is part of its training step.
"""

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xlab.data.cycle import source_ids
from xlab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from xlab.data.translation import collate_pairs
from xlab.errors import UserError
from xlab.generation import GenerationConfig, best_targets, decode_sources
from xlab.models.config import TransformerConfig
from xlab.models.cycle_networks import CycleNetwork, SharedModel
from xlab.models.cycle_synthetic import Diagnostics, SyntheticSources, finished
from xlab.models.losses import seq2seq_loss
from xlab.models.metrics import LMMetrics, corpus_scores, token_statistics
from xlab.models.optimizer import OptimizerConfig, build_optimizer, split_parameters
from xlab.models.training import TrainingModule
from xlab.models.transforms import Transform
from xlab.models.translator import gather_outputs, write_table

Topology = Literal["two_models", "shared", "adapters"]


@dataclass
class Mixing:
    """How the losses of a direction's update mix, by step (``trainer.global_step``, optimizer updates).

    Before ``cycle_start`` steps only paired examples train (a warm-up). The paired loss weighs
    ``paired_weight``, going linearly to ``paired_weight_end`` over ``paired_ramp_steps`` when that
    is set; the back-translation (cycle) loss weighs ``cycle_weight``; ``denoising_weight`` adds,
    for the shared topology, reconstructing real text from its noised self (noised as
    ``model.synthetic`` says, or by word drop 0.1 and shuffle 3 when it sets no noise).
    """

    paired_weight: float = 1.0
    paired_weight_end: float | None = None
    paired_ramp_steps: int = 0
    cycle_start: int = 0
    cycle_weight: float = 1.0
    denoising_weight: float = 0.0

    def __post_init__(self) -> None:
        weights = (self.paired_weight, self.paired_weight_end or 0.0, self.cycle_weight, self.denoising_weight)
        if min(weights) < 0 or self.paired_ramp_steps < 0 or self.cycle_start < 0:
            raise UserError("model.mixing weights, paired_ramp_steps and cycle_start must be >= 0")

    def paired(self, step: int) -> float:
        if self.paired_weight_end is None or self.paired_ramp_steps == 0:
            return self.paired_weight
        progress = min(step / self.paired_ramp_steps, 1.0)
        return self.paired_weight + progress * (self.paired_weight_end - self.paired_weight)


DEFAULT_DENOISING = SyntheticSources(word_drop=0.1, shuffle_distance=3.0)


class CycleTranslator(TrainingModule):
    """Two translation directions between ``languages``, trained on monolingual text by back-translation.

    ``implementation`` is the topology: ``two_models``, ``shared`` (one encoder-decoder, a target
    language token) or ``adapters`` (one base and an adapter per direction: add
    ``xlab.models.cycle_adapters.DirectionAdapters`` to ``transforms``). Manual optimization:
    each direction has its own AdamW and schedule (the shared model, and a trained base under
    adapters, have one for both), ``accumulate`` micro-batches per update, gradients clipped to
    ``gradient_clip`` per direction. ``init_from`` maps a direction to a paired-only translator
    checkpoint to start from (for one network shared by both directions, name one).
    Validation and test decode each direction's paired set (``num_beams``, ``max_new_tokens``) and
    log loss, exact match, BLEU and chrF per direction, plus their means over directions
    (``val/chrf``: the one to choose a checkpoint by).
    """

    family = "cycle"
    model: CycleNetwork

    def __init__(
        self,
        arch: TransformerConfig,
        optimizer: OptimizerConfig = OptimizerConfig(),
        implementation: Topology = "two_models",
        transforms: Sequence[Transform] = (),
        languages: tuple[str, str] = ("en", "it"),
        synthetic: SyntheticSources = SyntheticSources(),
        mixing: Mixing = Mixing(),
        init_from: dict[str, str] | None = None,
        accumulate: int = 1,
        gradient_clip: float | None = 1.0,
        label_smoothing: float = 0.1,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        examples: int = 5,
        examples_every: int = 200,
        seed: int = 0,
    ):
        super().__init__(arch, optimizer, transforms, implementation, network_options={"languages": list(languages)})
        self.save_hyperparameters({"synthetic": asdict(synthetic), "mixing": asdict(mixing)})
        self.automatic_optimization = False
        for direction in self.model.directions:
            self.model.direction(direction)  # the adapters topology checks its adapters are there
        if mixing.denoising_weight and not isinstance(self.model, SharedModel):
            raise UserError("model.mixing.denoising_weight is for the shared topology: set it to 0 or use shared")
        for direction in init_from or {}:
            self.model.check_direction(direction)
        if min(accumulate, num_beams, max_new_tokens, examples_every) < 1 or not 0 <= label_smoothing < 1:
            raise UserError(
                "model accumulate, num_beams, max_new_tokens and examples_every must be >= 1, label_smoothing in [0, 1)"
            )
        self.synthetic, self.mixing, self.init_from = synthetic, mixing, dict(init_from or {})
        self.accumulate, self.gradient_clip, self.label_smoothing = accumulate, gradient_clip, label_smoothing
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.examples, self.examples_every, self.seed = examples, examples_every, seed
        keys = [f"{stage}_{d}" for stage in ("val", "test") for d in self.model.directions]
        self.metrics = nn.ModuleDict({key: LMMetrics() for key in keys})
        self.outputs: dict[str, list[tuple[str, str, str]]] = {d: [] for d in self.model.directions}
        self.optimizer_of = self._optimizer_assignment()

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Each direction is updated once a batch; Lightning counts each update as a step."""
        return len(self.model.directions)

    def _optimizer_assignment(self) -> dict[str, int]:
        """Which optimizer each direction's update steps: its own, unless the directions share parameters."""
        first, second = (set(map(id, self.model.direction_parameters(d))) for d in self.model.directions)
        return dict(zip(self.model.directions, (0, 0) if first & second else (0, 1)))

    # ----- optimizers -----

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        config = self.optimizer_config
        count = max(self.optimizer_of.values()) + 1
        self.horizons = []
        optimizers, schedulers = [], []
        for index in range(count):
            directions = [d for d, i in self.optimizer_of.items() if i == index]
            parameters = {id(p): p for d in directions for p in self.model.direction_parameters(d)}
            groups = split_parameters(self.model, parameters.values(), config, claimed=[])
            optimizer = build_optimizer(groups, config, fused=self._fused_optimizer_allowed())
            # the run's updates (decay_steps, or as its budgets end it), of which this optimizer makes its share
            schedule = self._schedule(share=len(directions) / len(self.optimizer_of))
            optimizers.append(optimizer)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            schedulers.append({"scheduler": scheduler, "interval": "step", "name": f"lr-{'+'.join(directions)}"})
        return optimizers, schedulers

    def _optimizer(self, direction: str) -> tuple[Any, Any]:
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        index = self.optimizer_of[direction]
        return optimizers[index], schedulers[index]

    # ----- start -----

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self._trainer is not None else None
        languages = getattr(data, "languages", None)
        if languages is not None and tuple(languages) != self.model.languages:
            raise UserError(
                f"model.init_args.languages {list(self.model.languages)} differ from data.init_args.languages "
                f"{list(languages)}: make them agree"
            )
        if stage == "fit" and self.init_from and self.trainer.ckpt_path is None:
            self._initialise_from_translators(data)

    def _initialise_from_translators(self, data: Any) -> None:
        from xlab.checkpoint import load

        for direction, path in self.init_from.items():
            loaded = load(path)
            if loaded.family.name != "translator":
                raise UserError(f"model.init_from {direction}: {path} is not a translator checkpoint")
            tokenizer = getattr(data, "tokenizer", None)
            if tokenizer is not None and loaded.tokenizer.to_str() != tokenizer.to_str():
                raise UserError(f"model.init_from {direction}: {path} has another tokenizer than this data")
            copy_translator(loaded.model, self.model.direction(direction))

    # ----- training -----

    def tokens_in_batch(self, batch: dict[str, Any]) -> int:
        """Real target tokens trained on: each pool's sentences (plus end-of-sequence) and the paired targets."""
        pools = sum(len(ids) + 1 for lang in self.model.languages for ids in batch[lang]["ids"])
        paired = sum(int((batch[d]["target"] != PAD_ID).sum()) for d in self.model.directions if d in batch)
        return pools + paired

    def samples_in_batch(self, batch: dict[str, Any]) -> int:
        return sum(len(part["text"] if "text" in part else part["reference"]) for part in batch.values())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = [self._update(direction, batch) for direction in self.model.directions]
        self.log("train/loss", sum(losses) / len(losses), prog_bar=True)

    def _update(self, direction: str, batch: dict[str, Any]) -> float:
        """One optimizer update of ``direction`` on the batch; its total loss."""
        optimizer, scheduler = self._optimizer(direction)
        optimizer.zero_grad()
        parts = self._loss_parts(direction, batch)
        total = 0.0
        for name, (weight, pairs) in parts.items():
            loss = self._backward(direction, pairs, weight)
            self.log(f"train/{direction}/{name}_loss", loss)
            total += weight * loss
        if self.gradient_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return total

    def _loss_parts(self, direction: str, batch: dict[str, Any]) -> dict[str, tuple[float, dict[str, Any]]]:
        """The weighted batches of this update: paired, back-translated (cycle) and denoising, those that apply."""
        step, mixing = self.global_step, self.mixing
        parts = {}
        if direction in batch and mixing.paired(step) > 0:
            parts["paired"] = (mixing.paired(step), batch[direction])
        target_lang = self.model.target_language(direction)
        if step >= mixing.cycle_start and mixing.cycle_weight > 0:
            synthetic = self.synthesize(self.model.reverse(direction), batch[target_lang])
            if synthetic is not None:
                parts["cycle"] = (mixing.cycle_weight, synthetic)
        if mixing.denoising_weight > 0:
            parts["denoising"] = (mixing.denoising_weight, self._noised(batch[target_lang]))
        return parts

    def _backward(self, direction: str, pairs: dict[str, Any], weight: float) -> float:
        """Backpropagate ``weight`` x the token-mean loss of ``pairs`` through ``direction``, in ``accumulate``
        micro-batches each weighted by its share of the target tokens; the (unweighted) loss."""
        model = self.model.direction(direction)
        tokens = int((pairs["target"] != PAD_ID).sum())
        total = 0.0
        for part in micro_batches(pairs, self.accumulate):
            share = int((part["target"] != PAD_ID).sum()) / max(tokens, 1)
            logits = model(part["source"], part["target_input"], part["source_padding"], part["target_padding"])
            loss = seq2seq_loss(logits, part["target"], self.label_smoothing) * share
            self.manual_backward(loss * weight)
            total += float(loss.detach())
        return total

    @torch.no_grad()
    def synthesize(self, generating: str, real: dict[str, Any]) -> dict[str, Any] | None:
        """Translate the real sentences with direction ``generating`` into synthetic sources for the other
        direction: a padded pair batch (synthetic source -> real sentence), None when every one is dropped."""
        sources = [source_ids(ids) for ids in real["ids"]]
        limits = [self.synthetic.limit(len(ids)) for ids in sources]
        seed = self.seed + self.global_step * 2 + self.model.directions.index(generating)
        config = GenerationConfig(**self.synthetic.generation(max(limits), seed))
        with evaluating(self.model):
            decoded = decode_sources(self.model.direction(generating), sources, config)
        rows, diagnostics = self._synthetic_rows(real, decoded, limits, random.Random(seed))
        for name, value in diagnostics.rates().items():
            self.log(f"train/{generating}/{name}", value)
        if self.examples and self.global_step % self.examples_every < len(self.model.directions):
            examples = [(r["reference"], r["source_text"], r["reference"]) for r in rows[: self.examples]]
            columns = ("real sentence", "its synthetic translation", "real sentence")
            write_table(self, f"train/{generating}/synthetic", columns, examples, same="copy")
        return self._to_device(collate_pairs(rows)) if rows else None

    def _synthetic_rows(
        self, real: dict[str, Any], decoded: list, limits: list[int], rng: random.Random
    ) -> tuple[list[dict[str, Any]], Diagnostics]:
        """The pair rows (noised synthetic source -> real sentence) that ``model.synthetic`` keeps of the decoded
        translations of the real sentences, and what the batch shows."""
        tokenizer, diagnostics = self.trainer.datamodule.tokenizer, Diagnostics()
        candidates = []
        for ids, text, generated, limit in zip(real["ids"], real["text"], decoded, limits):
            output_ids, score = generated[0]
            output, ended = finished(output_ids, limit)
            kept = ended or self.synthetic.without_eos == "keep"
            output_text = tokenizer.decode(output, skip_special_tokens=True)
            diagnostics.add(output_text, text, len(output) + ended, len(ids) + 1, ended, kept)
            if kept:
                candidates.append((self.synthetic.confidence(output_ids, score), ids, text, output, output_text))
        confident = self.synthetic.most_confident([candidate[0] for candidate in candidates])
        diagnostics.unconfident = len(candidates) - len(confident)
        rows = [
            pair_row(self.synthetic.noise(output, rng), ids, output_text, text)
            for index, (_, ids, text, output, output_text) in enumerate(candidates)
            if index in confident
        ]
        return rows, diagnostics

    def _noised(self, real: dict[str, Any]) -> dict[str, Any]:
        noise = self.synthetic if self.synthetic.noised else DEFAULT_DENOISING
        rng = random.Random(self.seed + self.global_step)
        rows = [pair_row(noise.noise(ids, rng), ids, text, text) for ids, text in zip(real["ids"], real["text"])]
        return self._to_device(collate_pairs(rows))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value.to(self.device) if isinstance(value, Tensor) else value for key, value in batch.items()}

    # ----- evaluation -----

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, self.model.directions[dataloader_idx])

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, self.model.directions[dataloader_idx])

    def _evaluate(self, stage: str, batch: dict[str, Any], direction: str) -> None:
        model = self.model.direction(direction)
        logits = model(batch["source"], batch["target_input"], batch["source_padding"], batch["target_padding"])
        stats = token_statistics(logits, batch["target"], ignore_index=PAD_ID)
        self.metrics[f"{stage}_{direction}"].update(stats, batch["target_bytes"].sum())
        translations = self.translate_batch(direction, batch)
        self.outputs[direction].extend(zip(batch["source_text"], translations, batch["reference"]))

    def translate_batch(self, direction: str, batch: dict[str, Any]) -> list[str]:
        """Direction ``direction``'s translation of every source in ``batch``."""
        sources = [row[~padding].tolist() for row, padding in zip(batch["source"], batch["source_padding"])]
        targets = best_targets(self.model.direction(direction), sources, self.num_beams, self.max_new_tokens)
        tokenizer = self.trainer.datamodule.tokenizer
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in targets]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        raise UserError("a cycle translator has no predict split: translate with ./infer.py --direction")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        means: dict[str, list[float]] = {}
        for direction in self.model.directions:
            values = {k: float(v) for k, v in self.metrics[f"{stage}_{direction}"].compute().items()}
            self.metrics[f"{stage}_{direction}"].reset()
            outputs, self.outputs[direction] = gather_outputs(self.trainer, self.outputs[direction]), []
            _, hypotheses, references = zip(*outputs) if outputs else ((), (), ())
            values.update(corpus_scores(list(hypotheses), list(references)))
            for name, value in values.items():
                self.log(f"{stage}/{direction}/{name}", value, add_dataloader_idx=False)
                means.setdefault(name, []).append(value)
            columns = ("source", "translation", "reference")
            write_table(self, f"{stage}/{direction}/translations", columns, outputs[: self.examples])
        for name in ("loss", "exact_match", "bleu", "chrf"):
            value = sum(means[name]) / len(means[name])
            self.log(f"{stage}/{name}", value, prog_bar=stage == "val", add_dataloader_idx=False)


def micro_batches(pairs: dict[str, Any], count: int) -> Iterator[dict[str, Any]]:
    """``pairs`` cut by rows into ``count`` (at most one per row) consecutive parts."""
    rows = len(pairs["target"])
    for indices in torch.arange(rows).tensor_split(min(count, rows)):
        start, stop = int(indices[0]), int(indices[-1]) + 1
        yield {key: value[start:stop] for key, value in pairs.items()}


def pair_row(source: list[int], target: list[int], source_text: str, reference: str) -> dict[str, Any]:
    """An encoded pair as ``collate_pairs`` takes it: the source then end-of-sequence, start + target + end."""
    return {
        "source_ids": source_ids(source),
        "target_ids": [BOS_ID, *target, EOS_ID],
        "source_text": source_text,
        "reference": reference,
    }


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) inside the block, then back to the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def copy_translator(source: nn.Module, direction: nn.Module) -> None:
    """Copy a paired-only translator's weights into one direction of a cycle network. Where the direction has
    more rows (a shared model's language tokens and extra position), the translator's fill the first ones;
    PEFT's wrapped layers keep their base weights under ``base_layer``, and adapters keep their own."""
    weights = source.state_dict()
    target = getattr(direction, "model", direction)
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            key = name.replace(".base_layer", "")
            if ".lora_" in name:
                continue
            if key not in weights:
                raise UserError(f"model.init_from: the translator has no weight {key}: its architecture differs")
            value = weights[key]
            if value.shape[1:] != tensor.shape[1:] or value.shape[0] > tensor.shape[0]:
                raise UserError(
                    f"model.init_from: the translator's {key} is {tuple(value.shape)}, this model's "
                    f"{tuple(tensor.shape)}: use the architecture and data it was trained with"
                )
            tensor[: value.shape[0]].copy_(value)
