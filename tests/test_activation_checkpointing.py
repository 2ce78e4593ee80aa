"""Activation checkpointing: the same loss and gradients as the plain network, with fewer tensors kept for the
backward pass."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder
from xlab.models.network import Network, build_network

CONFIG = TransformerConfig(vocab_size=61, context_length=12, n_layers=3, d_model=32, n_heads=4, dropout=0.1)


def twins(network: type[Network]) -> tuple[Network, Network]:
    """The same weights, without and with activation checkpointing, in training mode (dropout on)."""
    torch.manual_seed(0)
    plain = build_network(network, CONFIG).train()
    checkpointed = build_network(network, replace(CONFIG, activation_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


def loss_of(model: Network, tokens: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout masks for both twins
    logits = model(tokens[:, :-1]) if isinstance(model, Decoder) else model(tokens[:, 1:], tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def saved_bytes(model: Network, tokens: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(model, tokens)
    return total


@pytest.mark.parametrize("network", [Decoder, EncoderDecoder])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(network: type[Network]):
    plain, checkpointed = twins(network)
    tokens = torch.randint(
        3, CONFIG.vocab_size, (4, CONFIG.context_length + 1), generator=torch.Generator().manual_seed(2)
    )
    losses = [loss_of(model, tokens) for model in (plain, checkpointed)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for loss in losses:
        loss.backward()
    for (name, ours), theirs in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(theirs.grad, ours.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("network", [Decoder, EncoderDecoder])
def test_checkpointing_keeps_far_fewer_activations(network: type[Network]):
    plain, checkpointed = twins(network)
    tokens = torch.randint(
        3, CONFIG.vocab_size, (4, CONFIG.context_length + 1), generator=torch.Generator().manual_seed(3)
    )
    assert saved_bytes(checkpointed, tokens) < 0.5 * saved_bytes(plain, tokens)


def test_checkpointing_is_off_in_eval_mode_and_without_gradients():
    _, checkpointed = twins(Decoder)
    tokens = torch.randint(3, CONFIG.vocab_size, (2, 8))
    checkpointed.eval()
    with torch.no_grad():
        assert saved_bytes(checkpointed, tokens) == 0
    plain_eval = build_network(Decoder, CONFIG).eval()
    plain_eval.load_state_dict(checkpointed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(tokens), plain_eval(tokens), rtol=0, atol=0)


def test_the_torch_reference_refuses_it_by_name():
    with pytest.raises(UserError, match="has no activation checkpointing"):
        TorchEncoderDecoder(replace(CONFIG, activation_checkpointing=True))
