"""Translation speed: XLab's from-scratch EncoderDecoder against the torch.nn.Transformer reference.

Both implementations (``Translator(implementation="xlab" | "torch")``) get the shape and options
of conf/translate.yaml (3 layers, d_model 256, 4 heads, GELU, pre-LayerNorm, sinusoidal
positions, dropout 0.1, tied embeddings, vocabulary 1000), the same weights (XLab's, copied into
torch's layout and checked to give the same logits) and the same real batches: English to
Italian number phrases from ``NumberPhrases``, encoded with a BPE tokenizer trained on them,
64 pairs a batch, as the experiment trains on.

Training: a step is forward, cross-entropy with label smoothing 0.1 ignoring padding, backward
and the Translator's AdamW step; tokens/s counts target tokens (end-of-sequence included,
padding not). After warm-up the models take turns in rounds (A B, B A, ...) over the same
batches; the table gives each model's median round and the median over rounds of its speed
relative to torch in that round.

Decoding: ``xlab.generation.decode_sources`` translates a batch of sources greedily and with
beam search, three ways: XLab with its KV cache, XLab re-running the decoder over the whole
prefix every step (``cached=False``), and the torch reference (no cache: the same re-running).
Random weights would end sentences at arbitrary points, so end-of-sequence is given no
probability: every variant decodes exactly ``--new-tokens`` tokens per sentence, which is
checked, and greedy outputs are checked identical across the three.

    python bench/translation.py                        # fp32 training, the experiment's model
    python bench/translation.py --precision bf16       # training under torch.autocast bf16
    python bench/translation.py --layers 6 --d-model 512 --heads 8 --activation relu --norm-placement post
"""

import argparse
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import OtherLoad, add_model_arguments, model_config, pick_device, time_call  # noqa: E402

from xlab.data.pairs import NumberPhrases  # noqa: E402
from xlab.data.tokenizer import EOS_ID  # noqa: E402
from xlab.data.translation import TranslationDataModule, collate_pairs  # noqa: E402
from xlab.generation import GenerationConfig, decode_sources  # noqa: E402
from xlab.models.config import TransformerConfig  # noqa: E402
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder  # noqa: E402
from xlab.models.losses import seq2seq_loss  # noqa: E402
from xlab.models.optimizer import OptimizerConfig  # noqa: E402
from xlab.models.translator import Translator  # noqa: E402

LABEL_SMOOTHING = 0.1  # conf/translate.yaml's
XLAB, REFERENCE = "XLab EncoderDecoder", "torch.nn.Transformer"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, context=64, layers=3, vocab=1000)
    parser.add_argument("--activation", choices=("gelu", "relu"), default="gelu")
    parser.add_argument("--norm-placement", choices=("pre", "post"), default="pre")
    parser.add_argument("--dropout", type=float, default=0.1, help="training dropout (decoding runs in eval mode)")
    parser.add_argument("--pairs", type=int, default=40_000, help="NumberPhrases pairs (the experiment's size)")
    parser.add_argument("--batch", type=int, default=64, help="training pairs per batch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and round (distinct batches)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision")
    parser.add_argument("--sources", type=int, default=64, help="sentences decoded at once")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens decoded per sentence")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes per variant and case; median reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def translation_config(args: argparse.Namespace) -> TransformerConfig:
    return replace(
        model_config(args),
        activation=args.activation,
        norm_placement=args.norm_placement,
        positions="sinusoidal",
        dropout=args.dropout,
    )


# ---------------------------------------------------------------------------------------------
# Data: real number-phrase pairs, encoded as TranslationDataModule encodes them


def number_phrase_pairs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, int | None]]:
    """The train split of ``--pairs`` English-Italian pairs as the experiment's TranslationDataModule encodes
    them (source ids + EOS, BOS + target ids + EOS), shuffled; and the model shapes that data gives."""
    source = NumberPhrases(source_lang="en", target_lang="it", size=args.pairs)
    with tempfile.TemporaryDirectory() as cache:
        data = TranslationDataModule(source, context_length=args.context, vocab_size=args.vocab, cache_dir=cache)
        data.prepare_data()
        data.setup("fit")
        items = list(data.datasets["train"])
        shapes = data.model_shapes()
    random.Random(0).shuffle(items)
    needed = args.steps * args.batch + args.sources
    if len(items) < needed:
        sys.exit(f"error: {len(items)} usable pairs, {needed} needed: raise --pairs")
    return items, shapes


def training_batches(items: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """``--steps`` padded batches of ``--batch`` pairs on ``device``, each with its count of target tokens."""
    batches = []
    for start in range(0, args.steps * args.batch, args.batch):
        collated = collate_pairs(items[start : start + args.batch])
        keys = ("source", "source_padding", "target_input", "target", "target_padding")
        batch = {key: collated[key].to(device) for key in keys}
        batch["tokens"] = int((~collated["target_padding"]).sum())
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------
# Models: the two implementations with the same weights


def build_models(config: TransformerConfig, device: torch.device) -> dict[str, Translator]:
    """A Translator of each implementation; torch's gets XLab's weights, so both start from the same point."""
    torch.manual_seed(0)
    modules = {
        name: Translator(config, OptimizerConfig(decay_steps=1), implementation=implementation)
        for name, implementation in ((XLAB, "xlab"), (REFERENCE, "torch"))
    }
    modules[REFERENCE].model = TorchEncoderDecoder.from_xlab(modules[XLAB].model)
    return {name: module.to(device) for name, module in modules.items()}


def check_same_function(models: dict[str, Translator], batch: dict[str, Any]) -> None:
    """The two implementations' logits agree on a real batch (eval mode): same size, same weights, same maths."""
    counts = {name: sum(p.numel() for p in module.model.parameters()) for name, module in models.items()}
    if len(set(counts.values())) != 1:
        sys.exit(f"error: the two models differ in parameter count ({counts}): not the same architecture")
    real = ~batch["target_padding"]
    with torch.no_grad():
        logits = [module.eval()(batch)[real] for module in models.values()]
    torch.testing.assert_close(*logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Training


def trainer(module: Translator, autocast: Callable[[], AbstractContextManager]) -> Callable[[list[dict]], None]:
    """Training steps on the given batches, one each: forward, label-smoothed loss, backward, AdamW step."""
    optimizer = module.configure_optimizers()["optimizer"]
    model = module.model.train()

    def train(batches: list[dict]) -> None:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = model(batch["source"], batch["target_input"], batch["source_padding"], batch["target_padding"])
            seq2seq_loss(logits, batch["target"], LABEL_SMOOTHING).backward()
            optimizer.step()

    return train


def training_rates(
    models: dict[str, Translator], batches: list[dict], args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, list[float]], OtherLoad]:
    """Target tokens/s of each model in each round, and the load other processes put on the machine meanwhile."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    trainers = {name: trainer(module, autocast) for name, module in models.items()}
    for train in trainers.values():
        train(batches[: args.warmup])
    tokens = sum(batch["tokens"] for batch in batches)
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    with OtherLoad() as load:
        for round_ in range(args.rounds):
            for name in trainers if round_ % 2 == 0 else reversed(trainers):
                rates[name].append(tokens / time_call(partial(trainers[name], batches), device))
    return rates, load


# ---------------------------------------------------------------------------------------------
# Decoding


@contextmanager
def without_eos(models: list[EncoderDecoder]) -> Iterator[None]:
    """End-of-sequence gets no probability while open, so random weights decode every sentence to full length."""

    def mask_eos(module: torch.nn.Module, inputs: tuple, logits: Tensor) -> None:
        logits[..., EOS_ID] = float("-inf")

    handles = [model.head.register_forward_hook(mask_eos) for model in models]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decoders(models: dict[str, Translator], sources: list[list[int]], config: GenerationConfig) -> dict[str, Callable]:
    """The three ways to decode ``sources``: each returns the best token ids per source."""

    def run(model: EncoderDecoder, cached: bool) -> Callable[[], list[list[int]]]:
        return lambda: [best[0][0] for best in decode_sources(model, sources, config, cached=cached)]

    xlab, reference = models[XLAB].model, models[REFERENCE].model
    return {"XLab cached": run(xlab, True), "XLab uncached": run(xlab, False), REFERENCE: run(reference, True)}


def decoding_rates(
    models: dict[str, Translator], sources: list[list[int]], beams: int, args: argparse.Namespace, device
) -> tuple[dict[str, list[float]], OtherLoad]:
    """Sentences/s of each decoder in each repeat, after checking that all of them decode the same number
    of tokens (and, greedy, the same tokens); and the load other processes put on the machine meanwhile."""
    config = GenerationConfig(max_new_tokens=args.new_tokens, num_beams=beams)
    runs = decoders(models, sources, config)
    outputs = {name: run() for name, run in runs.items()}  # also the warm-up
    lengths = {len(ids) for output in outputs.values() for ids in output}
    assert lengths == {args.new_tokens}, f"decoded lengths {sorted(lengths)}, not all {args.new_tokens}"
    if beams == 1:
        cached, uncached, reference = outputs.values()
        assert cached == uncached, "XLab's cached and uncached greedy decoding give different tokens"
        assert cached == reference, "XLab's and torch's greedy decoding give different tokens with the same weights"
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with OtherLoad() as load:
        for repeat in range(args.repeats):
            for name in runs if repeat % 2 == 0 else reversed(runs):
                rates[name].append(len(sources) / time_call(runs[name], device))
    return rates, load


def median_ratio(mine: list[float], theirs: list[float]) -> float:
    """The median over rounds of the speed ratio within each round (both measured under the same load)."""
    return statistics.median(a / b for a, b in zip(mine, theirs))


# ---------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    items, shapes = number_phrase_pairs(args)
    config = replace(translation_config(args), **shapes)
    batches = training_batches(items, args, device)
    sources = [item["source_ids"] for item in items[args.steps * args.batch :][: args.sources]]
    models = build_models(config, device)
    check_same_function(models, batches[0])

    train, train_load = training_rates(models, batches, args, device)
    for module in models.values():
        module.eval()
    with without_eos([module.model for module in models.values()]):
        decoding = {beams: decoding_rates(models, sources, beams, args, device) for beams in (1, args.beams)}

    trained = items[: args.steps * args.batch]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(
        f"model: {args.layers}+{args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_ff {config.d_ff}, "
        f"{args.activation}, {args.norm_placement}-norm, sinusoidal positions, vocab {config.vocab_size}, "
        f"{sum(p.numel() for p in models[XLAB].model.parameters()):,} parameters in both (same weights, "
        "logits checked equal)"
    )
    print(
        f"data: NumberPhrases en->it ({len(items):,} train pairs), BPE {config.vocab_size}; on average "
        f"{statistics.fmean(len(i['source_ids']) for i in trained):.1f} source and "
        f"{statistics.fmean(len(i['target_ids']) - 1 for i in trained):.1f} target tokens a pair, EOS included"
    )
    print_training(train, train_load, args)
    print_decoding(decoding, len(sources), args)
    return 0


def print_training(rates: dict[str, list[float]], load: OtherLoad, args: argparse.Namespace) -> None:
    print(
        f"\nTraining ({args.precision}, batch {args.batch}, dropout {args.dropout}, label smoothing "
        f"{LABEL_SMOOTHING}, AdamW): target tokens/s, median of {args.rounds} rounds of {args.steps} steps"
    )
    if warning := load.warning():
        print(warning)
    header = f"{'model':<22}{'tokens/s':>12}{'vs torch':>12}"
    print(f"{header}\n{'-' * len(header)}")
    for name, values in rates.items():
        print(f"{name:<22}{statistics.median(values):>12,.0f}{median_ratio(values, rates[REFERENCE]):>11.2f}x")


def print_decoding(
    decoding: dict[int, tuple[dict[str, list[float]], OtherLoad]], sources: int, args: argparse.Namespace
) -> None:
    print(
        f"\nDecoding (fp32, {sources} sources at once, exactly {args.new_tokens} tokens each: EOS masked, "
        f"lengths checked; greedy outputs identical in all three): sentences/s, median of {args.repeats} runs"
    )
    if warning := max((load for _, load in decoding.values()), key=lambda load: load.share or 0).warning():
        print(warning)
    columns = ("XLab cached", "XLab uncached", REFERENCE, "cached/uncached", "cached/torch")
    widths = [max(16, len(name) + 2) for name in columns]
    header = f"{'case':<10}" + "".join(f"{name:>{width}}" for name, width in zip(columns, widths))
    print(f"{header}\n{'-' * len(header)}")
    for beams, (rates, _) in decoding.items():
        cached, uncached, reference = rates.values()
        cells = [f"{statistics.median(values):,.1f}" for values in rates.values()]
        cells += [f"{median_ratio(cached, uncached):.2f}x", f"{median_ratio(cached, reference):.2f}x"]
        case = "greedy" if beams == 1 else f"beam {beams}"
        print(f"{case:<10}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))


if __name__ == "__main__":
    sys.exit(main())
