"""The decoding engine against references written here: full-sequence forward passes without a
cache, an argmax loop, exhaustive enumeration of continuations, and hand-computed filters.

Models are tiny random decoders whose weight matrices are re-drawn with a large standard
deviation, so that their distributions are peaked (no near-ties between tokens) and a wrong
mask, position or cache entry changes the logits by far more than rounding. Where the
engine's decisions are compared token for token, the models run in float64.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xlab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from xlab.errors import UserError
from xlab.generation import (
    GenerationConfig,
    Rows,
    apply_repetition_penalty,
    beam_search,
    encode_prompt,
    filter_logits,
    generate,
    next_token_logits,
    sample,
)
from xlab.models.cache import KVCache
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder

# ----------------------------------------------------------------------------------------------
# Models and references


def tiny_decoder(
    vocab: int = 40,
    max_positions: int = 32,
    positions: str = "learned",
    n_kv_heads: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Decoder:
    torch.manual_seed(seed)
    config = TransformerConfig(
        vocab_size=vocab,
        context_length=max_positions,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        positions=positions,
    )
    model = Decoder(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                nn.init.normal_(param, std=0.3)
    return model.to(dtype).eval()


class Biased(nn.Module):
    """A CausalModel that adds ``bias`` to the EOS logit wherever the input token is ``trigger``
    (a function of each token, so cached and uncached runs see the same thing)."""

    def __init__(self, model: Decoder, trigger: int | None = None, eos_bias: float = 0.0):
        super().__init__()
        self.model, self.trigger, self.eos_bias = model, trigger, eos_bias
        self.config = model.config

    def forward(self, tokens, positions=None, padding=None, cache=None):
        logits = self.model(tokens, positions=positions, padding=padding, cache=cache).clone()
        if self.trigger is None:
            logits[..., EOS_ID] += self.eos_bias
        else:
            logits[..., EOS_ID] += torch.where(tokens == self.trigger, self.eos_bias, 0.0)
        return logits

    def new_cache(self, batch, capacity):
        return self.model.new_cache(batch, capacity)


class FixedLogits:
    """A CausalModel stub: the same next-token logits after every prefix."""

    def __init__(self, logits: list[float], max_positions: int = 64):
        self.logits = torch.tensor(logits)
        self.config = SimpleNamespace(max_positions=max_positions)

    def __call__(self, tokens, positions=None, padding=None, cache=None):
        if cache is not None:
            cache.advance(tokens.size(1))
        return self.logits.expand(tokens.size(0), tokens.size(1), -1).clone()

    def new_cache(self, batch, capacity):
        return KVCache(1, batch, 1, 1, capacity, torch.float32, torch.device("cpu"))


class Scripted:
    """A CausalModel stub whose rows continue ``scripts[prompt]`` (then EOS), whatever they are fed.

    Rows are the prompts in order, each repeated for its samples or beams."""

    def __init__(self, scripts: list[list[int]], vocab: int, max_positions: int = 64):
        self.scripts, self.vocab = scripts, vocab
        self.config = SimpleNamespace(max_positions=max_positions)

    def __call__(self, tokens, positions=None, padding=None, cache=None):
        if cache is not None:
            cache.advance(tokens.size(1))
        batch, time = tokens.shape
        logits = torch.zeros(batch, time, self.vocab)
        for b in range(batch):
            script = self.scripts[b * len(self.scripts) // batch]
            for t in range(time):
                following = int(positions[b, t]) + 1
                logits[b, t, script[following] if following < len(script) else EOS_ID] = 10.0
        return logits

    def new_cache(self, batch, capacity):
        return KVCache(1, batch, 1, 1, capacity, torch.float32, torch.device("cpu"))


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (time, vocab) of one unpadded sequence, one forward pass, no cache, no mask."""
    return model(torch.tensor([ids]))[0]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int, penalty: float = 1.0) -> tuple[list[int], float]:
    """Argmax over the full model, re-run from scratch for every token; stops after EOS."""
    sequence, generated, score = list(prompt), [], 0.0
    for _ in range(steps):
        logits = full_logits(model, sequence)[-1].double()
        processed = logits.clone()
        for token in set(sequence):
            if token != PAD_ID:
                processed[token] = processed[token] / penalty if processed[token] > 0 else processed[token] * penalty
        token = int(processed.argmax())
        score += float(logits.log_softmax(-1)[token])
        generated.append(token)
        if token == EOS_ID:
            break
        sequence.append(token)
    return generated, score


def tokenizer_for(texts: list[str], vocab_size: int = 300):
    return train_tokenizer(texts * 5, vocab_size)


# ----------------------------------------------------------------------------------------------
# KV cache with left padding: incremental logits equal full-sequence logits


ARCHITECTURES = [
    pytest.param(positions, kv, id=f"{positions}-kv{kv}")
    for positions in ("learned", "sinusoidal", "rotary")
    for kv in (4, 2, 1)
]


@pytest.mark.parametrize("positions,n_kv_heads", ARCHITECTURES)
@pytest.mark.parametrize("lengths", [(5, 2, 3), (3, 3)], ids=["padded", "unpadded"])
def test_cached_steps_equal_uncached_full_sequences(positions, n_kv_heads, lengths):
    """Rows (left padding, positions, mask, KV cache) gives each row the logits its own unpadded
    sequence gets from one uncached forward pass, after the prefill and after every step."""
    model = tiny_decoder(positions=positions, n_kv_heads=n_kv_heads)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (n,), generator=generator).tolist() for n in lengths]
    steps = 4
    appended = torch.randint(3, 40, (len(prompts), steps), generator=generator)
    with torch.no_grad():
        rows = Rows(model, prompts, max(lengths) + steps)
        assert rows.padded == (len(set(lengths)) > 1)
        incremental = [rows.prefill()]
        for step in range(steps):
            incremental.append(rows.step(appended[:, step]))
    assert rows.full
    for row, prompt in enumerate(prompts):
        reference = full_logits(model, prompt + appended[row].tolist())
        for step, logits in enumerate(incremental):
            torch.testing.assert_close(
                logits[row], reference[len(prompt) - 1 + step], rtol=1e-4, atol=1e-4, msg=f"row {row} step {step}"
            )


@pytest.mark.parametrize("positions,n_kv_heads", [("learned", 4), ("rotary", 2)])
def test_cache_follows_reordered_rows(positions, n_kv_heads):
    """After reorder (beam search choosing parents), each row continues its parent's sequence."""
    model = tiny_decoder(positions=positions, n_kv_heads=n_kv_heads)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    parents = torch.tensor([2, 0, 0])
    first, second = torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32])
    with torch.no_grad():
        rows = Rows(model, prompts, 8)
        rows.prefill()
        rows.step(first)
        rows.reorder(parents)
        logits = rows.step(second)
    for row, parent in enumerate(parents.tolist()):
        reference = full_logits(model, prompts[parent] + [int(first[parent]), int(second[row])])
        torch.testing.assert_close(logits[row], reference[-1], rtol=1e-4, atol=1e-4, msg=f"row {row}")


# ----------------------------------------------------------------------------------------------
# Greedy decoding

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
STEPS = 8


@pytest.fixture(scope="module")
def eos_model() -> tuple[Biased, list[tuple[list[int], float]]]:
    """A float64 decoder that emits EOS after a token only the first prompt's greedy path produces,
    and the reference greedy continuations of PROMPTS under it."""
    base = tiny_decoder(dtype=torch.float64, seed=3)
    paths = [reference_greedy(base, prompt, STEPS)[0] for prompt in PROMPTS]
    others = {t for path in paths[1:] for t in path} | {prompt[-1] for prompt in PROMPTS}
    trigger = next(t for t in paths[0][1 : STEPS - 2] if t not in others and t != EOS_ID)
    model = Biased(base, trigger=trigger, eos_bias=1e3)
    references = [reference_greedy(model, prompt, STEPS) for prompt in PROMPTS]
    # the precondition of the tests below: one row ends early at EOS, another runs to the end
    assert references[0][0][-1] == EOS_ID and len(references[0][0]) < STEPS
    assert any(len(ids) == STEPS and EOS_ID not in ids for ids, _ in references[1:])
    return model, references


def test_greedy_equals_an_uncached_argmax_loop_and_stops_at_eos(eos_model):
    model, references = eos_model
    results = sample(model, PROMPTS, GenerationConfig(max_new_tokens=STEPS))
    for (per_prompt,), (ids, score) in zip(results, references):
        assert per_prompt[0] == ids
        assert per_prompt[1] == pytest.approx(score, abs=1e-4)


def test_greedy_each_prompt_alone_equals_the_batch(eos_model):
    model, references = eos_model
    for prompt, (ids, _) in zip(PROMPTS, references):
        assert sample(model, [prompt], GenerationConfig(max_new_tokens=STEPS))[0][0][0] == ids


def test_greedy_with_repetition_penalty_equals_reference():
    """The penalty covers the prompt and every token generated so far, row by row."""
    model = tiny_decoder(dtype=torch.float64, seed=4)
    penalty = 3.0
    config = GenerationConfig(max_new_tokens=STEPS, repetition_penalty=penalty)
    results = sample(model, PROMPTS, config)
    plain = sample(model, PROMPTS, GenerationConfig(max_new_tokens=STEPS))
    assert [r[0][0] for r in results] != [r[0][0] for r in plain]  # the penalty matters here
    for prompt, (per_prompt,) in zip(PROMPTS, results):
        assert per_prompt[0] == reference_greedy(model, prompt, STEPS, penalty)[0]


def test_sampling_at_temperature_zero_is_greedy(eos_model):
    model, references = eos_model
    config = GenerationConfig(max_new_tokens=STEPS, do_sample=True, temperature=0.0, seed=1)
    assert [r[0][0] for r in sample(model, PROMPTS, config)] == [ids for ids, _ in references]


@pytest.mark.parametrize("penalty", [1.0, 3.0])
def test_beam_search_with_one_beam_is_greedy(eos_model, penalty):
    model, _ = eos_model
    greedy = sample(model, PROMPTS, GenerationConfig(max_new_tokens=STEPS, repetition_penalty=penalty))
    config = GenerationConfig(max_new_tokens=STEPS, num_beams=1, repetition_penalty=penalty)
    beams = beam_search(model, PROMPTS, config)
    for (greedy_row,), (beam_row,) in zip(greedy, beams):
        assert beam_row[0] == greedy_row[0]
        if penalty == 1.0:  # the beam score is the same sum of log-probs, divided by the length
            assert beam_row[1] == pytest.approx(greedy_row[1] / len(greedy_row[0]), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Beam search against exhaustive enumeration

SMALL_VOCAB, BEAM_STEPS = 6, 3  # PAD=0, BOS=1, EOS=2 and three ordinary tokens


@torch.no_grad()
def every_continuation(
    model, prompt: list[int], steps: int, length_penalty: float, penalty: float = 1.0
) -> dict[tuple, float]:
    """Every continuation the engine could return (any token, PAD and BOS included, ending at EOS or
    cut after ``steps`` tokens), scored sum(log p) / len ** length_penalty (len counts the EOS);
    p after the repetition penalty over the prompt and the continuation so far."""
    scores = {}

    def expand(prefix: list[int], log_prob: float) -> None:
        logits = full_logits(model, prompt + prefix)[-1].clone()
        for token in set(prompt + prefix):
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        log_probs = logits.log_softmax(-1)
        for token in range(log_probs.size(0)):
            ids, total = prefix + [token], log_prob + float(log_probs[token])
            if token == EOS_ID or len(ids) == steps:
                scores[tuple(ids)] = total / len(ids) ** length_penalty
            else:
                expand(ids, total)

    expand([], 0.0)
    return scores


@pytest.mark.parametrize("length_penalty,penalty", [(0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 2.0)])
def test_beam_search_finds_the_exhaustive_best(length_penalty, penalty):
    """With num_beams >= vocab ** (steps - 1) no continuation is pruned before the last step, so the
    returned list is the top num_beams of every possible continuation, the best first."""
    model = tiny_decoder(vocab=SMALL_VOCAB, max_positions=16, dtype=torch.float64, seed=5)
    prompts = [[BOS_ID, 3, 4, 5], [BOS_ID, 4]]
    beams = SMALL_VOCAB ** (BEAM_STEPS - 1)
    config = GenerationConfig(
        max_new_tokens=BEAM_STEPS,
        num_beams=beams,
        num_return_sequences=beams,
        length_penalty=length_penalty,
        repetition_penalty=penalty,
    )
    results = beam_search(model, prompts, config)
    for prompt, returned in zip(prompts, results):
        reference = every_continuation(model, prompt, BEAM_STEPS, length_penalty, penalty)
        non_eos = SMALL_VOCAB - 1
        assert len(reference) == 1 + non_eos + non_eos**2 * SMALL_VOCAB
        ranked = sorted(reference, key=reference.get, reverse=True)
        assert reference[ranked[0]] - reference[ranked[1]] > 1e-3  # a clear winner to find
        ids = [tuple(i) for i, _ in returned]
        scores = [s for _, s in returned]
        assert ids[0] == ranked[0]
        assert len(ids) == beams and len(set(ids)) == beams
        assert scores == sorted(scores, reverse=True)
        for sequence, score in returned:
            assert score == pytest.approx(reference[tuple(sequence)], abs=1e-4), sequence
        # with this many beams nothing can be pruned: the list is the true top `beams`
        assert scores == pytest.approx([reference[r] for r in ranked[:beams]], abs=1e-4)


def test_beam_search_scores_are_the_sequences_scores_and_best_first():
    """With few beams the search may miss the optimum, but what it returns is scored honestly."""
    model = tiny_decoder(vocab=SMALL_VOCAB, max_positions=16, dtype=torch.float64, seed=6)
    prompts = [[BOS_ID, 3, 4, 5], [BOS_ID, 4]]
    config = GenerationConfig(max_new_tokens=BEAM_STEPS, num_beams=3, num_return_sequences=3, length_penalty=1.0)
    for prompt, returned in zip(prompts, beam_search(model, prompts, config)):
        reference = every_continuation(model, prompt, BEAM_STEPS, 1.0)
        scores = [s for _, s in returned]
        assert len(returned) == 3 and scores == sorted(scores, reverse=True)
        for sequence, score in returned:
            assert score == pytest.approx(reference[tuple(sequence)], abs=1e-4)


def test_beam_search_through_generate_decodes_text():
    tokenizer = tokenizer_for(["the model learns to predict the next token"])
    model = tiny_decoder(vocab=tokenizer.get_vocab_size(), seed=7)
    config = GenerationConfig(max_new_tokens=5, num_beams=4, num_return_sequences=2)
    (generations,) = generate(model, tokenizer, ["the model"], config)
    assert len(generations) == 2 and generations[0].score >= generations[1].score
    for generation in generations:
        assert generation.text == tokenizer.decode(generation.token_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# Logit filters

PROBS = [0.1, 0.5, 0.05, 0.2, 0.15]  # token 1 most likely, then 3, 4, 0, 2


def keep_reference(probs: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    """Which tokens Hugging Face's top-k, then top-p, then min-p warpers leave, computed by hand."""
    keep = set(range(len(probs)))
    if 0 < top_k < len(probs):
        kth = sorted(probs, reverse=True)[top_k - 1]
        keep = {i for i in keep if probs[i] >= kth}  # ties with the k-th survive
    if top_p < 1.0:
        total, mass, nucleus = sum(probs[i] for i in keep), 0.0, set()
        for i in sorted(keep, key=lambda i: -probs[i]):
            nucleus.add(i)
            mass += probs[i] / total
            if mass >= top_p:
                break
        keep = nucleus
    if min_p > 0.0:
        most = max(probs[i] for i in keep)
        keep = {i for i in keep if probs[i] >= min_p * most}
    return keep


def survivors(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


FILTER_CASES = [
    # (top_k, top_p, min_p, survivors written out by hand)
    (0, 1.0, 0.0, {0, 1, 2, 3, 4}),
    (2, 1.0, 0.0, {1, 3}),
    (1, 1.0, 0.0, {1}),
    (5, 1.0, 0.0, {0, 1, 2, 3, 4}),
    (9, 1.0, 0.0, {0, 1, 2, 3, 4}),
    (0, 0.45, 0.0, {1}),
    (0, 0.6, 0.0, {1, 3}),
    (0, 0.8, 0.0, {1, 3, 4}),
    (0, 0.9, 0.0, {0, 1, 3, 4}),
    (0, 0.99, 0.0, {0, 1, 2, 3, 4}),
    (0, 1e-9, 0.0, {1}),
    (0, 1.0, 0.25, {1, 3, 4}),
    (0, 1.0, 0.35, {1, 3}),
    (0, 1.0, 0.19, {0, 1, 3, 4}),
    (0, 1.0, 1.0, {1}),
    # combined, in Hugging Face's order: top-k renormalises before top-p (top-p alone keeps 4 here)
    (3, 0.8, 0.0, {1, 3}),
    # top-p before min-p (min-p first would leave {1, 3, 4} to a 0.8 nucleus: {1, 3})
    (0, 0.8, 0.25, {1, 3, 4}),
    (4, 0.8, 0.35, {1, 3}),
]


@pytest.mark.parametrize("top_k,top_p,min_p,expected", FILTER_CASES)
def test_filter_logits_keeps_exactly_the_expected_tokens(top_k, top_p, min_p, expected):
    assert keep_reference(PROBS, top_k, top_p, min_p) == expected  # the reference agrees with the hand count
    logits = torch.tensor(PROBS).log()
    shuffle = torch.tensor([3, 0, 4, 1, 2])  # the order of tokens in the vocabulary must not matter
    filtered = filter_logits(logits[shuffle], top_k, top_p, min_p)
    assert survivors(filtered) == {int(torch.nonzero(shuffle == i)) for i in expected}
    kept = torch.isfinite(filtered)
    assert torch.equal(filtered[kept], logits[shuffle][kept])  # survivors keep their logits
    assert torch.isneginf(filtered[~kept]).all()


def test_filter_logits_rows_are_independent():
    rows = torch.stack([torch.tensor(PROBS).log(), torch.tensor(PROBS[::-1]).log()])
    filtered = filter_logits(rows, top_k=3, top_p=0.8)
    assert survivors(filtered[0]) == {1, 3}
    assert survivors(filtered[1]) == {4 - 1, 4 - 3}


def test_top_k_keeps_every_token_tied_with_the_kth():
    filtered = filter_logits(torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0]), top_k=2)
    assert survivors(filtered) == {1, 2, 3}


def test_min_p_keeps_ties_with_the_threshold():
    assert survivors(filter_logits(torch.tensor([2.0, 2.0, 1.0]), min_p=1.0)) == {0, 1}


def test_top_p_among_equal_tokens_keeps_just_enough():
    filtered = filter_logits(torch.zeros(4), top_p=0.5)  # each token holds 0.25: two reach 0.5
    assert len(survivors(filtered)) == 2


def test_at_least_the_most_likely_token_always_survives():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=generator) * 4
    for top_k, top_p, min_p in [(1, 1e-9, 1.0), (0, 1e-6, 0.0), (0, 1.0, 1.0), (3, 0.01, 0.99)]:
        filtered = filter_logits(logits, top_k, top_p, min_p)
        assert torch.isfinite(filtered).any(-1).all()
        best = logits.argmax(-1, keepdim=True)
        assert torch.isfinite(filtered.gather(1, best)).all()


def test_filters_match_hugging_face_warpers():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 30, generator=generator) * 3
    ids = torch.zeros(64, 1, dtype=torch.long)
    for top_k, top_p, min_p in [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.1), (8, 0.9, 0.05), (20, 0.5, 0.2)]:
        expected = logits.clone()
        if top_k:
            expected = warpers.TopKLogitsWarper(top_k)(ids, expected)
        if top_p < 1.0:
            expected = warpers.TopPLogitsWarper(top_p)(ids, expected)
        if min_p:
            expected = warpers.MinPLogitsWarper(min_p)(ids, expected)
        torch.testing.assert_close(filter_logits(logits, top_k, top_p, min_p), expected, rtol=0, atol=0)


def test_repetition_penalty_is_ctrls():
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0, -4.0], [1.0, 1.0, -2.0, -2.0, 0.5]])
    seen = torch.tensor([[True, True, True, False, False], [False, True, False, True, True]])
    for penalty in (1.5, 0.5):
        expected = logits.clone()
        for row in range(2):
            for token in range(5):
                if seen[row, token]:
                    value = logits[row, token].item()
                    expected[row, token] = value / penalty if value > 0 else value * penalty
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, rtol=0, atol=0)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_matches_hugging_face():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * 2
    ids = torch.tensor([[1, 4, 4, 7], [0, 2, 3, 9], [5, 5, 5, 5]])
    seen = torch.zeros(3, 10, dtype=torch.bool).scatter_(1, ids, True)
    expected = warpers.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.7), expected, rtol=0, atol=0)


def test_next_token_logits_order_is_penalty_temperature_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, False, False, True]])
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=2, repetition_penalty=2.0)
    # penalty: [1.5, 2, 1, -2]; / 0.5: [3, 4, 2, -4]; top-2: tokens 0 and 1
    expected = torch.tensor([[3.0, 4.0, -math.inf, -math.inf]])
    torch.testing.assert_close(next_token_logits(logits, seen, config), expected)
    # temperature comes before top-p: at 0.5, [0.5, 0.3, 0.2] sharpens to [0.66, 0.24, 0.11]
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    nothing_seen = torch.zeros_like(probs, dtype=torch.bool)
    for temperature, kept in ((1.0, {0, 1}), (0.5, {0})):
        config = GenerationConfig(do_sample=True, temperature=temperature, top_p=0.6)
        assert survivors(next_token_logits(probs.log(), nothing_seen, config)[0]) == kept
    greedy = GenerationConfig(repetition_penalty=2.0)
    torch.testing.assert_close(next_token_logits(logits, seen, greedy), torch.tensor([[1.5, 2.0, 1.0, -2.0]]))


# ----------------------------------------------------------------------------------------------
# Sampling frequencies and seeds

RAW_LOGITS = [0.3, 1.5, -2.0, 0.9, 1.1, -0.4, 0.0, 2.0]  # token 2 is EOS, and unlikely
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 4, 1.0, 0.0), (1.3, 0, 0.75, 0.0), (1.0, 0, 1.0, 0.3), (0.8, 5, 0.9, 0.1)],
)
def test_sampling_frequencies_match_the_filtered_distribution(temperature, top_k, top_p, min_p):
    probs = torch.tensor(RAW_LOGITS, dtype=torch.float64).div(temperature).softmax(-1).tolist()
    keep = keep_reference(probs, top_k, top_p, min_p)
    expected = [probs[i] / sum(probs[j] for j in keep) if i in keep else 0.0 for i in range(len(probs))]

    copies, steps = 2000, 3
    config = GenerationConfig(
        max_new_tokens=steps, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        num_return_sequences=copies, seed=1234,
    )  # fmt: skip
    (rows,) = sample(FixedLogits(RAW_LOGITS), [[BOS_ID, 5]], config)
    counts = torch.zeros(len(probs))
    for ids, _ in rows:
        assert len(ids) == steps or ids[-1] == EOS_ID
        for token in ids:
            counts[token] += 1
    draws = counts.sum().item()
    assert draws >= copies * 2
    assert all(counts[i] == 0 for i in range(len(probs)) if i not in keep)
    chi2 = sum((counts[i].item() - draws * expected[i]) ** 2 / (draws * expected[i]) for i in keep)
    assert chi2 < CHI2_999[len(keep) - 1], (counts.tolist(), [draws * p for p in expected])


def test_sampling_scores_are_the_models_log_probs():
    config = GenerationConfig(max_new_tokens=3, do_sample=True, top_k=3, num_return_sequences=20, seed=0)
    log_probs = torch.tensor(RAW_LOGITS).log_softmax(-1)
    for ids, score in sample(FixedLogits(RAW_LOGITS), [[5]], config)[0]:
        assert score == pytest.approx(sum(log_probs[t].item() for t in ids), abs=1e-5)


def test_seed_makes_sampling_reproducible_and_independent_of_the_global_rng():
    model = tiny_decoder(seed=8)

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        config = GenerationConfig(max_new_tokens=12, do_sample=True, num_return_sequences=3, seed=seed)
        return sample(model, PROMPTS, config)

    first = run(11, 0)
    assert run(11, 99) == first
    assert run(12, 0) != first
    copies = [ids for ids, _ in first[0]]
    assert len({tuple(c) for c in copies}) > 1  # copies of a prompt are sampled independently


# ----------------------------------------------------------------------------------------------
# Stop strings

STOP_TEXTS = ["one two three four five six seven", "alpha beta gamma delta epsilon"]


@pytest.fixture(scope="module")
def scripted():
    tokenizer = tokenizer_for(STOP_TEXTS)
    scripts = [tokenizer.encode(text).ids for text in STOP_TEXTS]
    prompts = ["one", "alpha"]
    for prompt, script in zip(prompts, scripts):
        assert tokenizer.encode(prompt).ids == script[:1]
    return Scripted(scripts, tokenizer.get_vocab_size()), tokenizer, prompts, [s[1:] for s in scripts]


@pytest.mark.parametrize(
    "stop,expected_text",
    [
        (["four"], " two three "),
        (["hr"], " two t"),  # inside a token: the text is cut mid-token
        (["four", "three four"], " two "),  # both found at once: the earliest in the text wins
        (["three four", "four"], " two "),
        (["seven", "wo th"], " t"),  # the first found stops generation
        (["nowhere"], " two three four five six seven"),
    ],
)
def test_stop_strings_cut_the_text_and_end_only_that_row(scripted, stop, expected_text):
    model, tokenizer, prompts, continuations = scripted
    results = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=40, stop=stop))
    first, second = results[0][0], results[1][0]
    assert first.text == expected_text
    # generation stopped at the first token whose decoded text contains a stop string
    decoded = [tokenizer.decode(continuations[0][:n]) for n in range(len(continuations[0]) + 1)]
    ends = [n for n, text in enumerate(decoded) if any(s in text for s in stop)]
    assert first.token_ids == (continuations[0][: ends[0]] if ends else continuations[0] + [EOS_ID])
    # the other row ran to its own end
    assert second.token_ids == continuations[1] + [EOS_ID]
    assert second.text == " beta gamma delta epsilon"


def test_stop_strings_in_sampling_and_beam_search(scripted):
    model, tokenizer, prompts, continuations = scripted
    for config in (
        GenerationConfig(max_new_tokens=40, stop=["four"], do_sample=True, top_k=1, seed=0),
        GenerationConfig(max_new_tokens=40, stop=["four"], num_beams=2),
    ):
        results = generate(model, tokenizer, prompts, config)
        assert results[0][0].text == " two three "
        assert results[1][0].text == " beta gamma delta epsilon"


# ----------------------------------------------------------------------------------------------
# Configuration and prompts


@pytest.mark.parametrize(
    "options,words",
    [
        (dict(temperature=-0.1), ["temperature"]),
        (dict(top_p=0.0), ["top_p"]),
        (dict(top_p=1.5), ["top_p"]),
        (dict(top_k=-1), ["top_k"]),
        (dict(min_p=1.5), ["min_p"]),
        (dict(repetition_penalty=0.0), ["repetition_penalty"]),
        (dict(max_new_tokens=0), ["max_new_tokens"]),
        (dict(num_beams=0), ["num_beams"]),
        (dict(num_beams=2, num_return_sequences=3), ["num_return_sequences", "num_beams"]),
        (dict(num_return_sequences=2), ["num_return_sequences"]),
        (dict(stop=["ok", ""]), ["stop"]),
    ],
)
def test_config_validation_names_the_option(options, words):
    with pytest.raises(UserError) as error:
        GenerationConfig(**options)
    for word in words:
        assert word in str(error.value)


def test_config_rejects_beams_with_sampling_naming_both_options():
    with pytest.raises(UserError) as error:
        GenerationConfig(num_beams=2, do_sample=True)
    assert "num_beams" in str(error.value) and "do_sample" in str(error.value)


def test_config_accepts_its_edge_values():
    GenerationConfig(temperature=0.0, top_p=1.0, top_k=0, min_p=1.0)
    GenerationConfig(do_sample=True, num_return_sequences=4)
    GenerationConfig(num_beams=3, num_return_sequences=3)


def test_encode_prompt_rejects_empty_and_too_long_prompts():
    tokenizer = tokenizer_for(STOP_TEXTS)
    with pytest.raises(UserError, match="prompt 3 is empty"):
        encode_prompt(tokenizer, "", 2, 16)
    words = "one two three four five six seven"
    length = len(tokenizer.encode(words).ids)
    assert encode_prompt(tokenizer, words, 0, length + 1) == tokenizer.encode(words).ids
    with pytest.raises(UserError, match=f"prompt 1 has {length} tokens.*context holds {length}.*shorten"):
        encode_prompt(tokenizer, words, 0, length)
    model = tiny_decoder(vocab=tokenizer.get_vocab_size(), max_positions=8)
    with pytest.raises(UserError, match="prompt 2 is empty"):
        generate(model, tokenizer, ["one", ""], GenerationConfig(max_new_tokens=2))
    with pytest.raises(UserError, match="prompt 2 has"):
        generate(model, tokenizer, ["one", words], GenerationConfig(max_new_tokens=2))


# ----------------------------------------------------------------------------------------------
# A full context


def no_eos(max_positions: int, seed: int = 9) -> Biased:
    return Biased(tiny_decoder(max_positions=max_positions, dtype=torch.float64, seed=seed), eos_bias=-1e4)


def test_context_policy_stop_ends_when_the_context_is_full():
    """Every token is predicted from at most max_positions tokens, the last from a full context."""
    model = no_eos(max_positions=8)
    prompt = [5, 6, 7]
    config = GenerationConfig(max_new_tokens=20, context_policy="stop")
    ((ids, _),) = sample(model, [prompt], config)[0]
    assert len(prompt) + len(ids) == 8 + 1
    assert ids == reference_greedy(model, prompt, 6)[0]
    batch = sample(model, [prompt, [9, 10, 11, 12, 13]], config)
    assert [len(row[0][0]) for row in batch] == [4, 4]  # the longest prompt fills the shared context
    beams = beam_search(model, [prompt], GenerationConfig(max_new_tokens=20, num_beams=2))
    assert len(prompt) + len(beams[0][0][0]) <= 8 + 1


def test_context_policy_slide_continues_past_the_context():
    """When full, keep the last half of the window, re-encode it from position 0, go on."""
    max_positions, keep, steps = 8, 4, 20
    model = no_eos(max_positions)
    prompt = [5, 6, 7]
    config = GenerationConfig(max_new_tokens=steps, context_policy="slide")
    ((ids, _),) = sample(model, [prompt], config)[0]
    window, expected = list(prompt), []
    while len(expected) < steps:
        token = int(full_logits(model, window)[-1].argmax())
        expected.append(token)
        window = (window + [token])[-keep:] if len(window) == max_positions else window + [token]
    assert ids == expected
    batch = sample(model, [prompt, [9, 10, 11, 12, 13]], config)
    assert [len(row[0][0]) for row in batch] == [steps, steps]


def test_beam_search_refuses_to_slide():
    """Beam search cannot slide its window; asking for it is an error, not a silently short result."""
    with pytest.raises(UserError, match="context_policy 'slide'.*num_beams"):
        GenerationConfig(max_new_tokens=20, num_beams=2, context_policy="slide")
