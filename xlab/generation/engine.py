"""The strategies over token ids: greedy decoding, sampling and beam search on left-padded rows sharing one cache.

Every prompt is encoded once (prefill), then one token per step. The model is any ``CausalModel``;
``stop`` any ``StopCondition``. Each strategy returns, per prompt, a list of (generated ids, score).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from xlab.data.tokenizer import EOS_ID, PAD_ID
from xlab.generation.config import GenerationConfig
from xlab.generation.processors import next_token_logits
from xlab.generation.protocols import CausalModel, StopCondition

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
    stop: StopCondition | None = None,
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
    stop: StopCondition | None = None,
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
    stop: StopCondition | None,
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
