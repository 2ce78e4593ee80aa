"""The networks of a cycle-consistent translator: two translation directions between two languages in one module.

Three topologies, the family's implementations:

- ``TwoModels``: one encoder-decoder per direction, sharing nothing.
- ``SharedModel``: one encoder-decoder for both directions, told the target language by a
  language token before the source (two extra rows of the source embedding, beyond the
  tokenizer's vocabulary).
- ``AdapterModel``: one base encoder-decoder and one low-rank adapter per direction
  (``xlab.models.cycle_adapters.DirectionAdapters``, a transform), switched to the direction
  being run.

``direction(name)`` is what one direction is: an ``EncoderDecoder``, or a view of the shared
one that behaves like it, so that training, evaluation and the generation engine run each
direction the same way. ``direction_parameters(name)`` are the parameters an update of that
direction may change.
"""

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from xlab.data.cycle import check_languages, directions
from xlab.errors import UserError
from xlab.models.cache import KVCache
from xlab.models.config import TransformerConfig
from xlab.models.cycle_adapters import activate_adapter
from xlab.models.encoder_decoder import EncoderDecoder
from xlab.models.network import Network

DEFAULT_LANGUAGES = ("en", "it")


class CycleNetwork(Network):
    """Both directions between ``languages``; direction names are "source-target", e.g. "en-it"."""

    def __init__(self, config: TransformerConfig, languages: Sequence[str] = DEFAULT_LANGUAGES):
        super().__init__(config)
        self.languages = check_languages(tuple(languages))
        self.directions = directions(self.languages)

    def options(self) -> dict[str, Any]:
        """What, besides the architecture, rebuilds this network (recorded in checkpoints and exports)."""
        return {"languages": list(self.languages)}

    def check_direction(self, name: str) -> str:
        if name not in self.directions:
            raise UserError(f"this model has no direction {name!r}: it translates {' and '.join(self.directions)}")
        return name

    def reverse(self, name: str) -> str:
        """The other direction."""
        return next(d for d in self.directions if d != self.check_direction(name))

    def target_language(self, name: str) -> str:
        return self.check_direction(name).split("-")[1]

    def direction(self, name: str) -> nn.Module:
        """One direction as an encoder-decoder: ``forward``, ``encode``, ``decode``, ``new_cache``, ``config``."""
        raise NotImplementedError

    def direction_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters an update of direction ``name`` trains; the others are frozen during it."""
        raise NotImplementedError


class TwoModels(CycleNetwork):
    """One encoder-decoder per direction."""

    label = "cycle translator (two encoder-decoders)"

    def __init__(self, config: TransformerConfig, languages: Sequence[str] = DEFAULT_LANGUAGES):
        super().__init__(config, languages)
        self.models = nn.ModuleDict({d: EncoderDecoder(config) for d in self.directions})

    def direction(self, name: str) -> nn.Module:
        return self.models[self.check_direction(name)]

    def direction_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.direction(name).parameters())


class SharedModel(CycleNetwork):
    """One encoder-decoder for both directions; the source starts with the target language's token."""

    label = "cycle translator (one shared encoder-decoder, language tokens)"

    def __init__(self, config: TransformerConfig, languages: Sequence[str] = DEFAULT_LANGUAGES):
        super().__init__(config, languages)
        self.text_vocab = config.source_vocab_size or config.vocab_size
        inner = replace(config, source_vocab_size=self.text_vocab + 2, max_positions=config.max_positions + 1)
        self.model = EncoderDecoder(inner)

    def language_token(self, lang: str) -> int:
        """The source id that asks for a translation into ``lang``."""
        return self.text_vocab + self.languages.index(lang)

    def direction(self, name: str) -> nn.Module:
        return LanguageTagged(self.model, self.language_token(self.target_language(name)), self.config)

    def direction_parameters(self, name: str) -> list[nn.Parameter]:
        self.check_direction(name)
        return list(self.model.parameters())


class LanguageTagged(nn.Module):
    """An encoder-decoder whose every source starts with a fixed token: one direction of ``SharedModel``.

    Its ``config`` is the outer one, so callers see the positions their text may use.
    """

    def __init__(self, model: EncoderDecoder, token: int, config: TransformerConfig):
        super().__init__()
        self.model, self.token, self.config = model, token, config
        self.supports_cache = model.supports_cache

    def tagged(self, source: Tensor, source_padding: Tensor | None) -> tuple[Tensor, Tensor | None]:
        tag = source.new_full((source.size(0), 1), self.token)
        padding = None if source_padding is None else torch.cat([source_padding[:, :1] & False, source_padding], 1)
        return torch.cat([tag, source], 1), padding

    def forward(
        self, source: Tensor, target: Tensor, source_padding: Tensor | None = None, target_padding: Tensor | None = None
    ) -> Tensor:
        source, source_padding = self.tagged(source, source_padding)
        return self.model(source, target, source_padding, target_padding)

    def encode(self, source: Tensor, source_padding: Tensor | None = None) -> Tensor:
        return self.model.encode(*self.tagged(source, source_padding))

    def decode(
        self,
        target: Tensor,
        memory: Tensor,
        source_padding: Tensor | None = None,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """As ``EncoderDecoder.decode``; ``source_padding`` as the caller knows it, without the tag's position."""
        if source_padding is not None and source_padding.size(1) != memory.size(1):
            source_padding = torch.cat([source_padding[:, :1] & False, source_padding], 1)
        return self.model.decode(target, memory, source_padding, positions, padding, cache)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.model.new_cache(batch, capacity)


class AdapterModel(CycleNetwork):
    """One base encoder-decoder, one low-rank adapter per direction (applied by ``DirectionAdapters``)."""

    label = "cycle translator (one base encoder-decoder, an adapter per direction)"

    def __init__(self, config: TransformerConfig, languages: Sequence[str] = DEFAULT_LANGUAGES):
        super().__init__(config, languages)
        self.model = EncoderDecoder(config)
        self.train_base = False  # DirectionAdapters sets it

    def check_adapters(self) -> None:
        if not any(t.name == "direction_adapters" for t in self.transforms):
            raise UserError(
                "the adapters topology needs xlab.models.cycle_adapters.DirectionAdapters in model.init_args.transforms"
            )

    def direction(self, name: str) -> nn.Module:
        self.check_adapters()
        return AdapterDirection(self.model, self.check_direction(name))

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of direction ``name``'s adapter."""
        return [p for key, p in self.model.named_parameters() if f".{self.check_direction(name)}." in key]

    def base_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for d in self.directions for p in self.adapter_parameters(d)}
        return [p for p in self.model.parameters() if id(p) not in own]

    def direction_parameters(self, name: str) -> list[nn.Parameter]:
        self.check_adapters()
        return self.adapter_parameters(name) + (self.base_parameters() if self.train_base else [])


class AdapterDirection(nn.Module):
    """The base encoder-decoder with one direction's adapter active; every call switches to it first, so
    directions can be run in any order."""

    def __init__(self, model: EncoderDecoder, adapter: str):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.config, self.supports_cache = model.config, model.supports_cache

    def activate(self) -> None:
        activate_adapter(self.model, self.adapter)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.activate()
        return self.model(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Tensor:
        self.activate()
        return self.model.encode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Tensor:
        self.activate()
        return self.model.decode(*args, **kwargs)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.model.new_cache(batch, capacity)
