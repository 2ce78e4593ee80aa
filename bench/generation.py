"""Generation speed: XLab's KV-cached engine against recomputing the prefix, and against transformers.

One random-weight model of the default experiment's shape (context 512, so that 256 new
tokens fit after the prompt) is decoded three ways, with the same prompts, in the same run:
XLab's engine (``xlab.generation``, prefill once then one token per step), an uncached
greedy loop that runs the whole sequence through the model for every token, and Hugging
Face ``generate`` on the same weights exported with ``./manage.py export-checkpoint --format
hf`` (GPT-2 class). Greedy outputs are checked to be identical, so every column generates
the same tokens; tokens/s counts the tokens actually generated (a sequence may end at EOS).

    pip install -r bench/requirements.txt
    python bench/generation.py                       # CPU, 256 new tokens, batch 1 and 8
    python bench/generation.py --device cuda --batch 1 8 32
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_model_arguments, model_config, synchronize, transformers_and_device  # noqa: E402

from xlab.checkpoint import LoadedModel  # noqa: E402
from xlab.data.tokenizer import EOS_ID, train_tokenizer  # noqa: E402
from xlab.generation import GenerationConfig, beam_search, sample  # noqa: E402
from xlab.hf import write_hf  # noqa: E402
from xlab.models.decoder import Decoder  # noqa: E402
from xlab.models.network import build_network  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, context=512)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    return parser.parse_args()


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[Decoder, torch.nn.Module]:
    """XLab's decoder with random weights, and transformers' GPT-2 loaded from its Hugging Face export."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = model_config(args)
    model = build_network(Decoder, config).eval()
    tokenizer = train_tokenizer(["a small corpus for a tokenizer the export needs"], vocab_size=300)
    with tempfile.TemporaryDirectory() as directory:
        write_hf(LoadedModel(model, tokenizer), Path(directory) / "hf")
        reference = AutoModelForCausalLM.from_pretrained(Path(directory) / "hf").eval()
    return model.to(device), reference.to(device)


def uncached_greedy(model: Decoder, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy decoding that runs the whole sequence through the model for every new token."""
    tokens, finished = prompts, torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    with torch.inference_mode():
        for _ in range(new_tokens):
            next_tokens = model(tokens)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            finished |= next_tokens == EOS_ID
            if finished.all():
                break
    return [_until_eos(row[prompts.size(1) :].tolist()) for row in tokens]


def hf_generate(reference: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, beams: int) -> list[list[int]]:
    with torch.inference_mode():
        output = reference.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            num_beams=beams,
            pad_token_id=0,
            eos_token_id=EOS_ID,
        )
    return [_until_eos(row[prompts.size(1) :].tolist()) for row in output]


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


def timed(run: Callable[[], list[list[int]]], repeats: int, device: torch.device) -> tuple[float, list[list[int]]]:
    """Median tokens/s over ``repeats`` runs after one warm-up, and the tokens of the last run."""
    run()
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        output = run()
        synchronize(device)
        rates.append(sum(map(len, output)) / (time.perf_counter() - start))
    return statistics.median(rates), output


def case_row(
    model: Decoder, reference: torch.nn.Module, prompts: torch.Tensor, beams: int, args: argparse.Namespace, device
) -> str:
    """One table row: greedy (with the uncached loop) or beam search, for one batch of prompts."""
    config = GenerationConfig(max_new_tokens=args.new_tokens, num_beams=beams)
    decode = beam_search if beams > 1 else sample
    rows = prompts.tolist()
    cached, ours = timed(lambda: [r[0][0] for r in decode(model, rows, config)], args.repeats, device)
    theirs_rate, theirs = timed(lambda: hf_generate(reference, prompts, args.new_tokens, beams), args.repeats, device)
    if beams == 1:
        uncached, plain = timed(lambda: uncached_greedy(model, prompts, args.new_tokens), 1, device)
        assert ours == plain == theirs, "greedy outputs differ between the three decoders"
        plain_columns = f"{uncached:>17,.0f}{cached / uncached:>16.1f}x"
    else:
        plain_columns = f"{'-':>17}{'-':>17}"
    case = f"{'greedy' if beams == 1 else f'beam {beams}'}, batch {len(rows)}"
    return f"{case:<18}{cached:>17,.0f}{plain_columns}{theirs_rate:>17,.0f}{cached / theirs_rate:>16.2f}x"


def main() -> int:
    args = parse_args()
    transformers_version, device = transformers_and_device(args.device)
    model, reference = build_models(args, device)
    print(
        f"device {device}, torch {torch.__version__}, transformers {transformers_version}, "
        f"{torch.get_num_threads()} threads; model {args.layers} layers, d_model {args.d_model}, "
        f"context {args.context}, vocab {args.vocab}; prompt {args.prompt} tokens, {args.new_tokens} new tokens"
    )
    columns = ("XLab cached", "uncached", "cached/uncached", "transformers", "vs transformers")
    header = f"{'case':<18}" + "".join(f"{name:>17}" for name in columns)
    print(f"\n{header}\n{'-' * len(header)}")
    generator = torch.Generator().manual_seed(1)
    for batch in args.batch:
        prompts = torch.randint(3, args.vocab, (batch, args.prompt), generator=generator).to(device)
        print(case_row(model, reference, prompts, 1, args, device))
        if batch == 1:
            print(case_row(model, reference, prompts, args.beams, args, device))
    print("\ntokens/s: generated tokens over wall time, median of the timed runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
