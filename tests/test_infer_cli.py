"""./infer.py end to end, on a checkpoint trained once for this module: what it prints, that it
prints what the engine generates, and one clear line for every kind of bad input."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli, run_script, tiny_args, write_corpus
from xlab.checkpoint import load_model
from xlab.generation import GenerationConfig, generate
from xlab.infer_cli import Streamer

PROMPT = "The model"
SHORT = ["--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding runs/defaults/checkpoints/last.ckpt of a tiny model trained for 60 steps."""
    directory = tmp_path_factory.mktemp("infer")
    corpus = write_corpus(directory / "corpus")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)  # runs/ lands here; run_cli changes nothing else global
        assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=60", "--trainer.val_check_interval=30")) == 0
    return directory


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> str:
    path = workdir / "runs" / "defaults" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return str(path)


@pytest.fixture(scope="module")
def engine(checkpoint: str):
    """The same model and tokenizer, loaded in this process: the reference for what infer.py prints."""
    return load_model(checkpoint)


def expected(engine, prompts: list[str], **options) -> list[list]:
    model, tokenizer = engine
    return generate(model, tokenizer, prompts, GenerationConfig(**options))


def infer(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """./infer.py in its own process, as a user runs it (run_script, with standard input when given)."""
    if stdin is None:
        return run_script("infer.py", *args, cwd=cwd, timeout=120)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *args],
        cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


# ----------------------------------------------------------------------------------------------
# Output


def test_greedy_prints_the_prompt_and_the_engines_continuation_reproducibly(workdir, checkpoint, engine):
    (generation,) = expected(engine, [PROMPT], max_new_tokens=16)[0]
    assert generation.text.strip()  # the model says something; the comparison means something
    streamed = ok(infer(checkpoint, PROMPT, *SHORT, cwd=workdir))
    assert streamed == PROMPT + generation.text + "\n"
    assert ok(infer(checkpoint, PROMPT, *SHORT, cwd=workdir)) == streamed
    assert ok(infer(checkpoint, PROMPT, *SHORT, "--no-stream", cwd=workdir)) == streamed


def test_sampling_with_a_seed_is_reproducible(workdir, checkpoint, engine):
    sample = [*SHORT, "--do-sample", "--temperature", "1.5"]
    first = ok(infer(checkpoint, PROMPT, *sample, "--seed", "7", cwd=workdir))
    assert first.startswith(PROMPT)
    assert ok(infer(checkpoint, PROMPT, *sample, "--seed", "7", cwd=workdir)) == first
    assert ok(infer(checkpoint, PROMPT, *sample, "--seed", "8", cwd=workdir)) != first
    (generation,) = expected(engine, [PROMPT], max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)[0]
    assert first == PROMPT + generation.text + "\n"


def test_beam_search_prints_the_best_sequences_with_scores(workdir, checkpoint, engine):
    out = ok(infer(checkpoint, PROMPT, *SHORT, "--num-beams", "3", "--num-return-sequences", "2", cwd=workdir))
    lines = out.splitlines()
    headers = [re.fullmatch(r"--- prompt 1, sequence (\d) score (-?\d+\.\d{3})", line) for line in lines[::2]]
    assert len(lines) == 4 and all(headers), out
    assert [int(h.group(1)) for h in headers] == [1, 2]
    scores = [float(h.group(2)) for h in headers]
    assert scores[0] >= scores[1]
    generations = expected(engine, [PROMPT], max_new_tokens=16, num_beams=3, num_return_sequences=2)[0]
    assert scores == [round(g.score, 3) for g in generations]
    assert lines[1::2] == [PROMPT + g.text for g in generations]


BATCH = ["The model", "attention mixes", "the"]


def batch_output(engine) -> str:
    """What several prompts print: each decoded alone by the engine, so the batch must not change them."""
    lines = []
    for index, prompt in enumerate(BATCH):
        (generation,) = expected(engine, [prompt], max_new_tokens=16)[0]
        lines += [f"--- prompt {index + 1}, sequence 1 score {generation.score:.3f}", prompt + generation.text]
    return "\n".join(lines) + "\n"


def test_several_prompts_are_one_batch(workdir, checkpoint, engine):
    out = ok(infer(checkpoint, *BATCH, *SHORT, cwd=workdir))
    assert out == batch_output(engine)


def test_prompts_from_a_file_or_standard_input(workdir, checkpoint, engine):
    text = "\n".join([BATCH[0], "", BATCH[1], BATCH[2]]) + "\n"  # blank lines are skipped
    (workdir / "prompts.txt").write_text(text)
    assert ok(infer(checkpoint, "--file", "prompts.txt", *SHORT, cwd=workdir)) == batch_output(engine)
    assert ok(infer(checkpoint, "--file", "-", *SHORT, cwd=workdir, stdin=text)) == batch_output(engine)


def stop_across_tokens(engine) -> tuple[str, str]:
    """A stop string whose first character comes with one token and the rest with the next, and the
    text the engine returns for it: the greedy continuation cut just before it."""
    model, tokenizer = engine
    (generation,) = expected(engine, [PROMPT], max_new_tokens=16)[0]
    ids = generation.token_ids
    for k in range(2, len(ids)):
        before, after = tokenizer.decode(ids[:k]), tokenizer.decode(ids[: k + 1])
        if len(after) > len(before) and before:
            stop = before[-1] + after[len(before)]
            if stop not in before:
                return stop, after[: after.find(stop)]
    pytest.fail(f"no stop string spans two tokens of {generation.text!r}")


def test_stop_string_cuts_the_printed_text(workdir, checkpoint, engine):
    stop, text = stop_across_tokens(engine)
    assert ok(infer(checkpoint, PROMPT, *SHORT, "--stop", stop, "--no-stream", cwd=workdir)) == PROMPT + text + "\n"


def test_streamed_stop_string_cuts_the_printed_text(workdir, checkpoint, engine):
    stop, text = stop_across_tokens(engine)
    assert ok(infer(checkpoint, PROMPT, *SHORT, "--stop", stop, cwd=workdir)) == PROMPT + text + "\n"


def test_streamer_holds_back_a_possible_stop_string(engine, capsys):
    _, tokenizer = engine
    ids = tokenizer.encode(" a b c d").ids
    streamer = Streamer(tokenizer, [" c d"])
    for n in range(1, len(ids) + 1):
        streamer([ids[:n]])
    assert capsys.readouterr().out == " a b"


def test_help_lists_every_option_with_its_default(workdir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = ok(run_script("infer.py", "--help", cwd=workdir, timeout=120))
    entries = {}
    for entry in re.split(r"\n(?=  -)", out.split("options:", 1)[1]):
        match = re.match(r"\s*(--[a-z-]+)", entry.replace("-h, ", ""))
        if match:
            entries[match.group(1)] = " ".join(entry.split())
    defaults = {
        "--max-new-tokens": "64", "--do-sample": "False", "--temperature": "1.0", "--top-k": "0",
        "--top-p": "1.0", "--min-p": "0.0", "--repetition-penalty": "1.0", "--num-beams": "1",
        "--length-penalty": "1.0", "--early-stopping": "False", "--num-return-sequences": "1",
        "--stop": "[]", "--seed": "None", "--context-policy": "stop", "--device": "auto",
        "--file": "None", "--no-stream": "False",
    }  # fmt: skip
    assert set(defaults) <= set(entries), sorted(entries)
    for option, default in defaults.items():
        assert entries[option].endswith(f"(default: {default})"), entries[option]
    assert "CHECKPOINT" in out.upper() and "PROMPT" in out


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr starting 'error:', exit code 2, no traceback

LONG_PROMPT = "the model learns to predict " * 20


def bad_inputs(workdir: Path, checkpoint: str) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, words the error line must contain)"""
    truncated = workdir / "truncated.ckpt"
    truncated.write_bytes(Path(checkpoint).read_bytes()[:1000])
    (workdir / "notes.ckpt").write_text("not a checkpoint at all\n")
    torch.save(torch.zeros(3), workdir / "tensor.ckpt")
    return {
        "missing checkpoint": (["nowhere.ckpt", PROMPT], "nowhere.ckpt does not exist"),
        "truncated checkpoint": ([str(truncated), PROMPT], "is not a readable checkpoint"),
        "text file": ([str(workdir / "notes.ckpt"), PROMPT], "is not a readable checkpoint"),
        "tensor file": ([str(workdir / "tensor.ckpt"), PROMPT], "is not an XLab training checkpoint"),
        "temperature": ([checkpoint, PROMPT, "--temperature", "-1"], "temperature must be >= 0"),
        "top_p 0": ([checkpoint, PROMPT, "--top-p", "0"], "top_p must be in (0, 1]"),
        "top_p 1.5": ([checkpoint, PROMPT, "--top-p", "1.5"], "top_p must be in (0, 1]"),
        "top_k": ([checkpoint, PROMPT, "--top-k", "-1"], "top_k must be >= 0"),
        "return > beams": (
            [checkpoint, PROMPT, "--num-return-sequences", "3", "--num-beams", "2"],
            "num_return_sequences (3) cannot exceed num_beams (2)",
        ),
        "empty prompt": ([checkpoint, ""], "prompt 1 is empty"),
        "long prompt": ([checkpoint, LONG_PROMPT], "the model's context holds 32"),
        "device": ([checkpoint, PROMPT, "--device", "nosuchdevice"], "device 'nosuchdevice' is not available"),
        "no prompt": ([checkpoint], "no prompt"),
        "missing prompt file": ([checkpoint, "--file", "nowhere.txt"], "cannot read prompts from nowhere.txt"),
    }


@pytest.fixture(scope="module")
def bad_results(workdir: Path, checkpoint: str) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Every bad input run at once (a few processes side by side), checked one by one below."""
    cases = bad_inputs(workdir, checkpoint)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = {name: pool.submit(infer, *args, cwd=workdir) for name, (args, _) in cases.items()}
        return {name: (future.result(), cases[name][1]) for name, future in results.items()}


BAD = [
    "missing checkpoint", "truncated checkpoint", "text file", "tensor file", "temperature", "top_p 0", "top_p 1.5",
    "top_k", "return > beams", "empty prompt", "long prompt", "device", "no prompt", "missing prompt file",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_clear_line(bad_results, name):
    result, words = bad_results[name]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_prints_nothing_on_stdout(bad_results, name):
    assert bad_results[name][0].stdout == ""
