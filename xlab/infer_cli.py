"""``./infer.py``: continue prompts with a language model, or translate them with a translator."""

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields

import torch
from tokenizers import Tokenizer

from xlab.checkpoint import LoadedModel, load
from xlab.errors import UserError
from xlab.generation import (
    Generation,
    GenerationConfig,
    StopStrings,
    encode_prompt,
    encode_source,
    generate,
    translate,
)

HELP = {
    "max_new_tokens": "tokens to generate at most",
    "do_sample": "sample from the distribution instead of taking the most likely token",
    "temperature": "divide logits by this before sampling (0: greedy)",
    "top_k": "sample among the k most likely tokens only (0: all)",
    "top_p": "sample among the most likely tokens whose probability adds up to p (nucleus)",
    "min_p": "drop tokens less likely than min_p times the most likely one",
    "repetition_penalty": "penalise tokens already in the prompt or output (>1 discourages repeats)",
    "num_beams": "beam search with this many beams (1: no beam search)",
    "length_penalty": "beam score = log-prob / length ** length_penalty",
    "early_stopping": "stop beam search as soon as num_beams sequences have ended",
    "num_return_sequences": "continuations per prompt (samples, or the best beams)",
    "stop": "end a continuation at this string (repeatable); the output stops just before it",
    "seed": "random seed, for reproducible sampling",
    "context_policy": "when the context is full: stop, or slide the window",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer.py",
        description="Continue prompts with an XLab language model, or translate them with a translator. "
        "Options follow Hugging Face generate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="training checkpoint (.ckpt) or export (.safetensors)")
    parser.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help="text to continue or translate; several are one batch"
    )
    parser.add_argument("--file", help="read prompts from this file, one per line ('-': standard input)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--direction", help="for a model of several directions (a cycle translator): which one, e.g. it-en"
    )
    parser.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    for spec in fields(GenerationConfig):
        default = spec.default if spec.default is not MISSING else spec.default_factory()
        name = "--" + spec.name.replace("_", "-")
        if spec.name == "stop":
            parser.add_argument(name, action="append", default=[], help=HELP[spec.name])
        elif isinstance(default, bool):
            parser.add_argument(name, action="store_true", help=HELP[spec.name])
        elif spec.name == "context_policy":
            parser.add_argument(name, choices=("stop", "slide"), default=default, help=HELP[spec.name])
        else:
            kind = int if spec.name == "seed" else type(default)
            parser.add_argument(name, type=kind, default=default, help=HELP[spec.name])
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
        except OSError as error:
            raise UserError(f"cannot read prompts from {args.file}: {error.strerror}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt: give one after the checkpoint, or --file")
    return prompts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise UserError(f"device '{name}' is not available here: use auto, cpu, cuda or cuda:N") from None
    return device


class Streamer:
    """Prints one row's new text as it is generated.

    Holds back an incomplete UTF-8 character and any ending that could be the start of a
    stop string, so that nothing printed is ever cut later; ``finish`` prints the rest.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.printed = tokenizer, StopStrings(stop, tokenizer), ""

    def __call__(self, generated: list[list[int]]) -> None:
        text = self.stop.cut(self.tokenizer.decode(generated[0], skip_special_tokens=True))
        if text.endswith("\ufffd"):
            return
        self._print(text[: len(text) - self.stop.partial_match(text)])

    def finish(self, text: str) -> None:
        self._print(text)
        print()

    def _print(self, text: str) -> None:
        print(text[len(self.printed) :], end="", flush=True)
        self.printed = max(self.printed, text, key=len)


def print_results(prompts: list[str], results: list[list[Generation]], echo_prompt: bool) -> None:
    """Each generation, the prompt before it for a language model; headed by its rank and score when several."""
    for index, (prompt, generations) in enumerate(zip(prompts, results)):
        for rank, generation in enumerate(generations):
            if len(prompts) > 1 or len(generations) > 1:
                print(f"--- prompt {index + 1}, sequence {rank + 1} score {generation.score:.3f}")
            print((prompt if echo_prompt else "") + generation.text)


def choose_direction(loaded: LoadedModel, direction: str | None) -> torch.nn.Module:
    """The network to run: the model, or for a model of several directions the one ``direction`` names."""
    directions = getattr(loaded.model, "directions", None)
    if directions is None:
        if direction is not None:
            raise UserError("--direction is for models that translate both ways (cycle translators): drop it")
        return loaded.model
    if direction not in directions:
        wrong = f"has no direction {direction!r}" if direction else "translates both ways"
        raise UserError(f"this model {wrong}: choose one with --direction ({' or '.join(directions)})")
    return loaded.model.direction(direction)


class Runner:
    """The loaded model's way of turning prompts into generations: continuation or translation."""

    def __init__(self, loaded: LoadedModel, direction: str | None = None):
        self.loaded = loaded
        self.translating = loaded.family.inference == "translate"
        self.model = choose_direction(loaded, direction)

    def check(self, prompts: list[str]) -> None:
        """Raise the UserError for the first empty or over-long prompt, before any output."""
        check = encode_source if self.translating else encode_prompt
        tokenizer = self.loaded.source_tokenizer if self.translating else self.loaded.tokenizer
        for index, prompt in enumerate(prompts):
            check(tokenizer, prompt, index, self.model.config.max_positions)

    def __call__(
        self, prompts: list[str], config: GenerationConfig, on_step: Callable[[list[list[int]]], None] | None = None
    ) -> list[list[Generation]]:
        loaded = self.loaded
        if self.translating:
            return translate(self.model, loaded.source_tokenizer, loaded.tokenizer, prompts, config, on_step)
        return generate(self.model, loaded.tokenizer, prompts, config, on_step)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # prompts may follow options: CKPT --direction it-en TEXT
    try:
        options = {spec.name: getattr(args, spec.name) for spec in fields(GenerationConfig)}
        config = GenerationConfig(**options)
        prompts = read_prompts(args)
        loaded = load(args.checkpoint)
        loaded.model.to(resolve_device(args.device)).eval()
        run = Runner(loaded, args.direction)
        run.check(prompts)
        stream = not args.no_stream and len(prompts) == 1 and config.num_beams == 1 and config.num_return_sequences == 1
        if stream:
            print("" if run.translating else prompts[0], end="", flush=True)
            streamer = Streamer(loaded.tokenizer, config.stop)
            streamer.finish(run(prompts, config, on_step=streamer)[0][0].text)
        else:
            print_results(prompts, run(prompts, config), echo_prompt=not run.translating)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
