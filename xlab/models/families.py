"""The registry of model families: the one place that knows what each family is made of.

A family is a kind of model XLab trains: its networks (by implementation name), its
LightningModule, how it is run for inference, which tokenizers it carries and which export
formats it supports. Checkpoint and export loading, ``infer.py``, ``manage.py`` and the
Hugging Face export consult this registry; a new family is one entry here plus its classes.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.cycle_networks import AdapterModel, SharedModel, TwoModels
from xlab.models.decoder import Decoder
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder
from xlab.models.network import Network, build_network
from xlab.models.transforms import Transform

DEFAULT_IMPLEMENTATION = "xlab"


@dataclass(frozen=True)
class Family:
    """One model family.

    ``module`` is the class path of its LightningModule (a path, since the modules import this
    registry). ``inference``: ``continue`` a prompt, or ``translate`` a source. ``tokenizers``
    are the keys under which checkpoints and exports keep them, the one the model writes with
    first; a missing later one is the same as the first.
    """

    name: str
    module: str
    networks: Mapping[str, type[Network]]
    inference: Literal["continue", "translate"]
    tokenizers: tuple[str, ...]
    export_formats: tuple[str, ...]

    def build(
        self,
        arch: TransformerConfig,
        implementation: str = DEFAULT_IMPLEMENTATION,
        transforms: Sequence[Transform] = (),
        options: Mapping[str, Any] | None = None,
    ) -> Network:
        """A new network of this family through ``build_network``; ``options`` as ``Network.options`` records."""
        if implementation not in self.networks:
            known = ", ".join(self.networks)
            raise UserError(f"the {self.name} family has no implementation {implementation!r}: use one of {known}")
        return build_network(self.networks[implementation], arch, transforms, options)

    def implementation(self, network: Network) -> str:
        """The implementation name of ``network``, an instance of one of this family's networks."""
        return next(name for name, cls in self.networks.items() if type(network) is cls)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="lm",
            module="xlab.models.lm.LanguageModel",
            networks={"xlab": Decoder},
            inference="continue",
            tokenizers=("tokenizer",),
            export_formats=("xlab", "hf"),
        ),
        Family(
            name="translator",
            module="xlab.models.translator.Translator",
            networks={"xlab": EncoderDecoder, "torch": TorchEncoderDecoder},
            inference="translate",
            tokenizers=("tokenizer", "source_tokenizer"),
            export_formats=("xlab",),
        ),
        Family(
            name="cycle",
            module="xlab.models.cycle.CycleTranslator",
            networks={"two_models": TwoModels, "shared": SharedModel, "adapters": AdapterModel},
            inference="translate",
            tokenizers=("tokenizer", "source_tokenizer"),
            export_formats=("xlab",),
        ),
    )
}


def family_of(network: Network) -> Family:
    """The family whose networks include ``network``'s class."""
    for family in FAMILIES.values():
        if type(network) in family.networks.values():
            return family
    raise ValueError(f"{type(network).__name__} belongs to no registered model family")


def resolve(record: Mapping[str, Any], origin: str) -> tuple[Family, str]:
    """The family and implementation a checkpoint's hyperparameters or an export's metadata name.

    Files written before the registry name a network class instead (``network``), or nothing for
    a language model; those still resolve.
    """
    name = record.get("family")
    if name is not None:
        if name not in FAMILIES:
            raise UserError(f"{origin} holds a model of the {name!r} family, which this XLab lacks: update XLab")
        return FAMILIES[name], record.get("implementation", DEFAULT_IMPLEMENTATION)
    legacy = record.get("network", Decoder.__name__)
    for family in FAMILIES.values():
        for implementation, cls in family.networks.items():
            if cls.__name__ == legacy:
                return family, implementation
    raise UserError(f"{origin} holds a {legacy}, which this XLab cannot build: update XLab")
