"""One decoding engine for every model: KV-cached greedy decoding, sampling and beam search.

Names and meanings follow Hugging Face ``generate``. A model is anything with
``forward(tokens, positions=, padding=, cache=) -> logits``, ``new_cache(batch, capacity)`` and a
``config.max_positions``, as ``xlab.models.decoder.Decoder`` has. Prompts of different lengths
are left-padded and masked; every prompt is encoded once (prefill), then one token per step.
Encoder-decoders (``translate``) run on the same strategies through ``ConditionedDecoder``.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from tokenizers import Tokenizer
from torch import Tensor

from xlab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from xlab.errors import UserError
from xlab.models.cache import KVCache


class CausalModel(Protocol):
    config: object

    def __call__(
        self, tokens: Tensor, positions: Tensor | None = None, padding: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor: ...

    def new_cache(self, batch: int, capacity: int) -> KVCache: ...


@dataclass
class GenerationConfig:
    """How to continue a prompt; the names and meanings of Hugging Face ``generate``.

    ``temperature`` 0 means greedy. ``stop``: strings that end a sequence; the returned text
    ends just before the first of them. ``context_policy``: when the model's context is full,
    ``stop`` there, or ``slide`` the window (keep the last half and re-encode it).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    context_policy: Literal["stop", "slide"] = "stop"

    def __post_init__(self) -> None:
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (not 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty <= 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams < 1, f"num_beams must be at least 1, got {self.num_beams}"),
            (self.num_return_sequences < 1, "num_return_sequences must be at least 1"),
            (
                self.num_beams > 1 and self.num_return_sequences > self.num_beams,
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})",
            ),
            (
                self.num_beams == 1 and not self.sampling and self.num_return_sequences > 1,
                "greedy decoding returns one sequence: use sampling or beam search for num_return_sequences > 1",
            ),
            (self.num_beams > 1 and self.do_sample, "num_beams > 1 cannot be combined with do_sample: drop one"),
            (
                self.num_beams > 1 and self.context_policy == "slide",
                "context_policy 'slide' works with greedy decoding and sampling, not with num_beams > 1",
            ),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ]
        for failed, message in problems:
            if failed:
                raise UserError(message)

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0


@dataclass
class Generation:
    """One continuation: its text (cut at a stop string), token ids and score.

    ``score`` is the length-penalised log-probability for beam search, else the sum of the
    model's log-probabilities of the generated tokens.
    """

    text: str
    token_ids: list[int]
    score: float


def generate(
    model: CausalModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[Generation]]:
    """Continue each prompt; ``config.num_return_sequences`` generations per prompt, best first for beams.

    ``on_step`` receives the token ids generated so far for every row after each step (streaming).

    >>> model, tokenizer = load_model("runs/xlab/checkpoints/last.ckpt")  # xlab.checkpoint
    >>> generate(model, tokenizer, ["The list type"], GenerationConfig(max_new_tokens=40))[0][0].text
    """
    prompt_ids = [
        encode_prompt(tokenizer, prompt, index, model.config.max_positions) for index, prompt in enumerate(prompts)
    ]
    stop = StopStrings(config.stop, tokenizer) if config.stop else None
    decoder = beam_search if config.num_beams > 1 else sample
    return _generations(tokenizer, decoder(model, prompt_ids, config, stop, on_step), stop)


def _generations(
    tokenizer: Tokenizer, results: list[list[tuple[list[int], float]]], stop: "StopStrings | None"
) -> list[list[Generation]]:
    return [
        [Generation(_text(tokenizer, ids, stop), ids, score) for ids, score in per_prompt] for per_prompt in results
    ]


def encode_prompt(tokenizer: Tokenizer, prompt: str, index: int, max_positions: int) -> list[int]:
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UserError(f"prompt {index + 1} is empty: give some text to continue")
    if len(ids) >= max_positions:
        raise UserError(
            f"prompt {index + 1} has {len(ids)} tokens; the model's context holds {max_positions}, "
            f"so at most {max_positions - 1} leave room to generate: shorten it"
        )
    return ids


def _text(tokenizer: Tokenizer, ids: list[int], stop: "StopStrings | None") -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return stop.cut(text) if stop else text


class StopStrings:
    """Finds the given strings in decoded continuations."""

    def __init__(self, strings: Sequence[str], tokenizer: Tokenizer):
        self.strings = tuple(strings)
        self.tokenizer = tokenizer

    def found(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in self.strings)

    def partial_match(self, text: str) -> int:
        """Length of the longest ending of ``text`` that begins a stop string (and may yet complete it)."""
        return max((k for s in self.strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def cut(self, text: str) -> str:
        """``text`` up to, not including, the earliest stop string."""
        return text[: min((i for s in self.strings if (i := text.find(s)) >= 0), default=len(text))]


# ---------------------------------------------------------------------------------------------
# Logit processing, the shared part of every strategy


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty as in Hugging Face: seen tokens' positive logits divided, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set to -inf every token that top-k, then top-p (nucleus), then min-p remove; at least one survives."""
    removed = torch.zeros_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        removed |= logits < kth
    logits = logits.masked_fill(removed, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # mass before this token already reaches top_p
        removed |= drop.scatter(-1, order, drop)
        logits = logits.masked_fill(removed, -math.inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        removed |= probs < min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(removed, -math.inf)
    return logits


def next_token_logits(logits: Tensor, seen: Tensor, config: GenerationConfig) -> Tensor:
    """Repetition penalty, temperature and filtering, in Hugging Face's order."""
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.sampling:
        logits = filter_logits(logits / config.temperature, config.top_k, config.top_p, config.min_p)
    return logits


# ---------------------------------------------------------------------------------------------
# Batches of left-padded rows sharing one cache


class Rows:
    """Token rows decoded together: left padding, positions, the cache and its padding mask."""

    def __init__(self, model: CausalModel, rows: list[list[int]], capacity: int):
        self.model = model
        self.rows = rows
        self.cache = model.new_cache(len(rows), capacity)
        length = max(map(len, rows))
        device = self.cache.device
        self.tokens = torch.tensor([[PAD_ID] * (length - len(r)) + r for r in rows], device=device)
        self.padding = self.tokens.new_tensor([[True] * (length - len(r)) + [False] * len(r) for r in rows]).bool()
        self.padded = bool(self.padding.any())
        self.positions = ((~self.padding).cumsum(1) - 1).clamp(min=0)

    def seen_tokens(self, vocab: int) -> Tensor:
        """(rows, vocab) True for each token in a row's prompt, for the repetition penalty."""
        seen = torch.zeros(len(self.tokens), vocab, dtype=torch.bool, device=self.tokens.device)
        seen.scatter_(1, self.tokens, True)
        seen[:, PAD_ID] = False
        return seen

    def prefill(self) -> Tensor:
        """Logits of the next token after each row's prompt."""
        padding = self.padding if self.padded else None
        logits = self.model(self.tokens, positions=self.positions, padding=padding, cache=self.cache)
        self.next_position = self.positions[:, -1] + 1
        return logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Logits after appending one token to each row."""
        self.padding = torch.cat([self.padding, self.padding.new_zeros(len(tokens), 1)], dim=1)
        padding = self.padding if self.padded else None
        logits = self.model(tokens[:, None], positions=self.next_position[:, None], padding=padding, cache=self.cache)
        self.next_position = self.next_position + 1
        return logits[:, -1]

    def reorder(self, parents: Tensor) -> None:
        self.cache.reorder(parents)
        self.padding = self.padding[parents]
        self.next_position = self.next_position[parents]

    @property
    def full(self) -> bool:
        return self.cache.length >= self.cache.capacity


def _start(
    model: CausalModel, prompts: list[list[int]], copies: int, config: GenerationConfig
) -> tuple[Rows, Tensor, Tensor]:
    """Each prompt ``copies`` times in one prefilled batch: the batch, next-token logits and seen tokens."""
    rows = [prompt for prompt in prompts for _ in range(copies)]
    capacity = min(model.config.max_positions, max(map(len, rows)) + config.max_new_tokens)
    batch = Rows(model, rows, capacity)
    logits = batch.prefill()
    return batch, logits, batch.seen_tokens(logits.size(-1))


# ---------------------------------------------------------------------------------------------
# Greedy and sampling


@torch.inference_mode()
def sample(
    model: CausalModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    stop: StopStrings | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[tuple[list[int], float]]]:
    """Greedy decoding, or multinomial sampling when ``config.do_sample``; per prompt a list of (ids, score)."""
    copies = config.num_return_sequences
    batch, logits, seen = _start(model, prompts, copies, config)
    rows = batch.rows
    generator = torch.Generator(logits.device).manual_seed(config.seed) if config.seed is not None else None
    generated: list[list[int]] = [[] for _ in rows]
    scores = torch.zeros(len(rows), device=logits.device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
    for step in range(config.max_new_tokens):
        processed = next_token_logits(logits, seen, config)
        if config.sampling:
            tokens = torch.multinomial(processed.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            tokens = processed.argmax(-1)
        tokens = tokens.masked_fill(finished, PAD_ID)
        scores += logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1).masked_fill(finished, 0.0)
        for row in (~finished).nonzero().flatten().tolist():
            generated[row].append(tokens[row].item())
            if tokens[row] == EOS_ID or (stop and stop.found(generated[row])):
                finished[row] = True
        seen.scatter_(1, tokens[:, None], True)
        if on_step:
            on_step(generated)
        if finished.all() or step == config.max_new_tokens - 1:
            break
        if batch.full:
            if config.context_policy == "stop":
                break
            batch = _slide(model, rows, generated, config)
            logits = batch.prefill()
        else:
            logits = batch.step(tokens)
    per_row = [(ids, score) for ids, score in zip(generated, scores.tolist())]
    return [per_row[i : i + copies] for i in range(0, len(per_row), copies)]


def _slide(model: CausalModel, prompts: list[list[int]], generated: list[list[int]], config: GenerationConfig) -> Rows:
    """A fresh batch holding the last half of the context of each row, to continue past a full context."""
    keep = model.config.max_positions // 2
    rows = [(prompt + ids)[-keep:] for prompt, ids in zip(prompts, generated)]
    return Rows(model, rows, model.config.max_positions)


# ---------------------------------------------------------------------------------------------
# Beam search


class Hypotheses:
    """The best ``num_beams`` finished sequences of one prompt, scored by log-prob / length ** length_penalty."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.items: list[tuple[float, list[int]]] = []

    def add(self, ids: list[int], log_prob: float) -> None:
        self.items.append((log_prob / len(ids) ** self.length_penalty, ids))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams :]

    def done(self, best_running_log_prob: float, length: int) -> bool:
        """Whether no running beam can still enter the list (Hugging Face's heuristic unless early_stopping)."""
        if len(self.items) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.items[-1][0] >= best_running_log_prob / length**self.length_penalty


@torch.inference_mode()
def beam_search(
    model: CausalModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    stop: StopStrings | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[tuple[list[int], float]]]:
    """Beam search with ``config.num_beams`` beams per prompt; the cache follows each beam's parent."""
    beams = config.num_beams
    batch, logits, seen = _start(model, prompts, beams, config)
    rows = batch.rows
    device = logits.device
    beam_scores = torch.full((len(prompts), beams), -math.inf, device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    sequences: list[list[int]] = [[] for _ in rows]
    hypotheses = [Hypotheses(beams, config.length_penalty, config.early_stopping) for _ in prompts]
    done = [False] * len(prompts)
    for step in range(config.max_new_tokens):
        log_probs = next_token_logits(logits, seen, config).log_softmax(-1)
        vocab = log_probs.size(-1)
        candidates = (beam_scores.view(-1, 1) + log_probs).view(len(prompts), beams * vocab)
        top_scores, top_index = candidates.topk(2 * beams, dim=1)
        parents, tokens, new_scores = [], [], []
        for prompt in range(len(prompts)):
            chosen = _extend(prompt, top_scores[prompt], top_index[prompt], vocab, sequences, hypotheses, done, stop)
            for parent, token, score in chosen:
                parents.append(prompt * beams + parent)
                tokens.append(token)
                new_scores.append(score)
        parent_index = torch.tensor(parents, device=device)
        token_tensor = torch.tensor(tokens, device=device)
        sequences = [sequences[p] + [t] for p, t in zip(parents, tokens)]
        beam_scores = torch.tensor(new_scores, device=device).view(len(prompts), beams)
        for prompt in range(len(prompts)):
            done[prompt] = done[prompt] or hypotheses[prompt].done(beam_scores[prompt].max().item(), step + 1)
        if on_step:
            on_step(sequences)
        if all(done) or step == config.max_new_tokens - 1 or batch.full:
            break
        batch.reorder(parent_index)
        seen = seen[parent_index].scatter_(1, token_tensor[:, None], True)
        logits = batch.step(token_tensor)
    for prompt, hyps in enumerate(hypotheses):
        if not done[prompt]:
            for beam, score in enumerate(beam_scores[prompt].tolist()):
                if score > -math.inf:
                    hyps.add(sequences[prompt * beams + beam], score)
    return [[(ids, score) for score, ids in hyps.items[: config.num_return_sequences]] for hyps in hypotheses]


def _extend(
    prompt: int,
    scores: Tensor,
    indices: Tensor,
    vocab: int,
    sequences: list[list[int]],
    hypotheses: list[Hypotheses],
    done: list[bool],
    stop: StopStrings | None,
) -> list[tuple[int, int, float]]:
    """The next (parent beam, token, score) of one prompt's beams; candidates that end go to its hypotheses."""
    beams = len(scores) // 2
    if done[prompt]:
        return [(0, PAD_ID, -math.inf)] * beams
    chosen = []
    for rank, (score, index) in enumerate(zip(scores.tolist(), indices.tolist())):
        parent, token = divmod(index, vocab)
        ids = sequences[prompt * beams + parent] + [token]
        if token == EOS_ID or (stop and stop.found(ids)):
            if rank < beams and score > -math.inf:
                hypotheses[prompt].add(ids, score)
            continue
        chosen.append((parent, token, score))
        if len(chosen) == beams:
            break
    return chosen + [(0, PAD_ID, -math.inf)] * (beams - len(chosen))


# ---------------------------------------------------------------------------------------------
# Encoder-decoder models: given its encoded sources, the decoder is a causal model of the target


class Seq2SeqModel(Protocol):
    """What the engine needs of an encoder-decoder (xlab.models.encoder_decoder.EncoderDecoder)."""

    config: object
    supports_cache: bool

    def encode(self, source: Tensor, source_padding: Tensor | None = None) -> Tensor: ...

    def decode(
        self,
        target: Tensor,
        memory: Tensor,
        source_padding: Tensor | None = None,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor: ...

    def new_cache(self, batch: int, capacity: int) -> KVCache: ...

    def parameters(self) -> Iterator[Tensor]: ...


def translate(
    model: Seq2SeqModel,
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    texts: Sequence[str],
    config: GenerationConfig,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[Generation]]:
    """Translate each text; like ``generate``, ``config.num_return_sequences`` generations per text.

    >>> loaded = load("runs/translate/checkpoints/best.ckpt")  # xlab.checkpoint
    >>> translate(loaded.model, loaded.source_tokenizer, loaded.tokenizer, ["twelve"], GenerationConfig())[0][0].text
    'dodici'
    """
    sources = [
        encode_source(source_tokenizer, text, index, model.config.max_positions) for index, text in enumerate(texts)
    ]
    stop = StopStrings(config.stop, target_tokenizer) if config.stop else None
    return _generations(target_tokenizer, decode_sources(model, sources, config, stop, on_step), stop)


def encode_source(tokenizer: Tokenizer, text: str, index: int, max_positions: int) -> list[int]:
    """The encoder's input: the text's tokens, then end-of-sequence, as the translation data has it."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise UserError(f"text {index + 1} is empty: give something to translate")
    if len(ids) >= max_positions:
        raise UserError(
            f"text {index + 1} has {len(ids)} tokens; the model reads at most {max_positions - 1} "
            "(plus end-of-sequence): shorten it"
        )
    return ids + [EOS_ID]


@torch.inference_mode()
def decode_sources(
    model: Seq2SeqModel,
    sources: list[list[int]],
    config: GenerationConfig,
    stop: StopStrings | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
    cached: bool = True,
) -> list[list[tuple[list[int], float]]]:
    """Decode target token ids for encoder inputs ``sources``, starting from the start token; per source a list
    of (ids, score). ``cached=False`` re-runs the decoder over the whole prefix at every step instead."""
    decoder = ConditionedDecoder(model, sources, cached)
    strategy = beam_search if config.num_beams > 1 else sample
    return strategy(decoder, [[BOS_ID]] * len(sources), config, stop, on_step)


class TokenHistory:
    """Stands in for the KV cache when decoding without one: it keeps the tokens, not their keys and values."""

    def __init__(self, batch: int, capacity: int, device: torch.device):
        self.tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
        self.capacity = capacity
        self.device = device

    @property
    def length(self) -> int:
        return self.tokens.size(1)

    def reorder(self, indices: Tensor) -> None:
        self.tokens = self.tokens[indices]


class ConditionedDecoder:
    """An encoder-decoder's decoder bound to encoded sources: the causal model the engine decodes.

    The encoder runs once, here. The engine puts the copies of each source (beams, return
    sequences) in adjacent rows and only ever reorders rows among the copies of one source,
    which share their encoder output; so the output is expanded once, when the cache is made.
    Every prompt is the start token alone, so rows never need padding.
    """

    def __init__(self, model: Seq2SeqModel, sources: list[list[int]], cached: bool = True):
        self.model, self.config = model, model.config
        self.cached = cached and model.supports_cache
        device = next(model.parameters()).device
        length = max(map(len, sources))
        source = torch.tensor([ids + [PAD_ID] * (length - len(ids)) for ids in sources], device=device)
        self.padding = torch.tensor([[i >= len(ids) for i in range(length)] for ids in sources], device=device)
        self.memory = model.encode(source, self.padding)

    def new_cache(self, batch: int, capacity: int) -> KVCache | TokenHistory:
        copies = batch // len(self.memory)
        self.row_memory = self.memory.repeat_interleave(copies, dim=0)
        self.row_padding = self.padding.repeat_interleave(copies, dim=0)
        if self.cached:
            return self.model.new_cache(batch, capacity)
        return TokenHistory(batch, capacity, self.memory.device)

    def __call__(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: KVCache | TokenHistory | None = None,
    ) -> Tensor:
        if isinstance(cache, TokenHistory):
            cache.tokens = torch.cat([cache.tokens, tokens], dim=1)
            return self.model.decode(cache.tokens, self.row_memory, self.row_padding)[:, -tokens.size(1) :]
        return self.model.decode(tokens, self.row_memory, self.row_padding, positions, padding, cache)
