"""The encoder-decoder transformer of "Attention Is All You Need", for translation. Plain PyTorch, no Lightning.

``EncoderDecoder`` assembles the blocks of layers.py: bidirectional self-attention in the
encoder; causal self-attention and cross-attention to the encoder output in the decoder.
``TorchEncoderDecoder`` has the same embeddings, head and interface around
``torch.nn.Transformer``, as a reference to train and compare against.
"""

import torch
from torch import Tensor, nn

from xlab.errors import UserError
from xlab.models.cache import KVCache
from xlab.models.config import TransformerConfig
from xlab.models.layers import Block, RotaryEmbedding, attention_mask, make_norm
from xlab.models.network import Network


class EncoderDecoder(Network):
    """Source and target embeddings, an encoder stack, a decoder stack and an output head over the target vocabulary.

    ``tie_embeddings`` ties the target embedding to the output projection. Positions are
    shared by both sides; padding is given as boolean masks, True at padding positions. The
    source vocabulary is ``source_vocab_size`` (default: ``vocab_size``, one shared tokenizer).
    """

    label = "encoder-decoder"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.source_embed = nn.Embedding(config.source_vocab_size or config.vocab_size, config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        rotary = self.init_inputs(config)
        self.build_stacks(config, rotary)
        self.init_head(2 * config.n_layers)

    def build_stacks(self, config: TransformerConfig, rotary: RotaryEmbedding | None) -> None:
        pre_norm = config.norm_placement == "pre"
        self.encoder = nn.ModuleList(Block(config, rotary=rotary) for _ in range(config.n_layers))
        self.encoder_norm = make_norm(config) if pre_norm else nn.Identity()
        self.decoder = nn.ModuleList(Block(config, cross_attention=True, rotary=rotary) for _ in range(config.n_layers))
        self.final_norm = make_norm(config) if pre_norm else nn.Identity()

    def forward(
        self,
        source: Tensor,
        target: Tensor,
        source_padding: Tensor | None = None,
        target_padding: Tensor | None = None,
    ) -> Tensor:
        """Logits (batch, target time, vocab) of the next target token at each target position.

        Target padding can only follow the real tokens, so causal attention already keeps it out
        of every real position; ``target_padding`` is accepted for the reference implementation.
        """
        memory = self.encode(source, source_padding)
        return self.decode(target, memory, source_padding)

    def encode(self, source: Tensor, source_padding: Tensor | None = None) -> Tensor:
        """The encoder output (batch, source time, d_model)."""
        positions = torch.arange(source.size(1), device=source.device)
        x = self.embed_tokens(self.source_embed, source, positions)
        mask = attention_mask(source.size(1), source_padding, causal=False, device=source.device)
        for block in self.encoder:
            x = self.run_block(block, x, mask=mask, positions=positions)
        return self.encoder_norm(x)

    def decode(
        self,
        target: Tensor,
        memory: Tensor,
        source_padding: Tensor | None = None,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Next-token logits for ``target`` (batch, time) given the encoder output; the rest as in Decoder.forward."""
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + target.size(1), device=target.device)
        mask = attention_mask(target.size(1), padding, causal=True, device=target.device)
        y = self.embed_tokens(self.embed, target, positions)
        context_mask = None if source_padding is None else ~source_padding[:, None, None, :]
        for index, block in enumerate(self.decoder):
            layer_cache = cache.layer(index) if cache is not None else None
            y = self.run_block(
                block,
                y,
                mask=mask,
                is_causal=mask is None,
                positions=positions,
                context=memory,
                context_mask=context_mask,
                cache=layer_cache,
            )
        if cache is not None:
            cache.advance(target.size(1))
        return self.logits(self.final_norm(y))


class TorchEncoderDecoder(EncoderDecoder):
    """The same model with ``torch.nn.Transformer`` for the two stacks: the reference implementation.

    It has no KV cache, so decoding re-runs the decoder over the whole prefix at every step.
    """

    label = "encoder-decoder (torch.nn.Transformer)"
    supports_cache = False

    @classmethod
    def from_xlab(cls, model: EncoderDecoder) -> "TorchEncoderDecoder":
        """The same function as ``model`` (same config, a copy of its weights) on ``torch.nn.Transformer``."""
        reference = cls(model.config).to(next(model.parameters()).dtype)
        own = {k: v for k, v in model.state_dict().items() if not k.startswith(("encoder", "decoder", "final_norm"))}
        missing, unexpected = reference.load_state_dict(own, strict=False)
        assert not unexpected and all(key.startswith("transformer.") for key in missing), (missing, unexpected)
        copy_stacks_to_torch(model, reference.transformer)
        return reference.to(next(model.parameters()).device)

    def build_stacks(self, config: TransformerConfig, rotary: RotaryEmbedding | None) -> None:
        check_torch_compatible(config)
        pre_norm = config.norm_placement == "pre"
        options = {
            "d_model": config.d_model,
            "nhead": config.n_heads,
            "dim_feedforward": config.d_ff,
            "dropout": config.dropout,
            "activation": config.activation,
            "layer_norm_eps": config.norm_eps,
            "batch_first": True,
            "norm_first": pre_norm,
            "bias": config.bias,
        }

        def final_norm() -> nn.Module | None:
            return make_norm(config) if pre_norm else None

        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**options), config.n_layers, norm=final_norm(), enable_nested_tensor=False
        )
        decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**options), config.n_layers, norm=final_norm())
        self.transformer = nn.Transformer(
            config.d_model, config.n_heads, custom_encoder=encoder, custom_decoder=decoder, batch_first=True
        )

    def encode(self, source: Tensor, source_padding: Tensor | None = None) -> Tensor:
        positions = torch.arange(source.size(1), device=source.device)
        x = self.embed_tokens(self.source_embed, source, positions)
        return self.transformer.encoder(x, src_key_padding_mask=source_padding)

    def decode(
        self,
        target: Tensor,
        memory: Tensor,
        source_padding: Tensor | None = None,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        if cache is not None or padding is not None:
            raise ValueError("the torch.nn.Transformer reference decodes without a cache or target padding")
        if positions is None:
            positions = torch.arange(target.size(1), device=target.device)
        y = self.embed_tokens(self.embed, target, positions)
        causal = nn.Transformer.generate_square_subsequent_mask(target.size(1), device=target.device, dtype=y.dtype)
        y = self.transformer.decoder(
            y, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=source_padding
        )
        return self.logits(y)


def copy_stacks_to_torch(model: EncoderDecoder, transformer: nn.Transformer) -> None:
    """Copy the encoder and decoder stacks of ``model`` into ``transformer``, in its layout: query, key and
    value projections stacked in ``in_proj``; the final norms where both have them (pre-norm)."""
    stacks = ((model.encoder, transformer.encoder.layers), (model.decoder, transformer.decoder.layers))
    with torch.no_grad():
        for blocks, layers in stacks:
            for block, layer in zip(blocks, layers, strict=True):
                attentions = [(block.self_attn, layer.self_attn)]
                if block.cross_attn is not None:
                    attentions.append((block.cross_attn, layer.multihead_attn))
                for ours, theirs in attentions:
                    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
                    if theirs.in_proj_bias is not None:
                        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
                    theirs.out_proj.load_state_dict(ours.out_proj.state_dict())
                layer.linear1.load_state_dict(block.mlp.in_proj.state_dict())
                layer.linear2.load_state_dict(block.mlp.out_proj.state_dict())
                norms = [layer.norm1, layer.norm2] + ([layer.norm3] if block.cross_attn is not None else [])
                for ours, theirs in zip(block.norms, norms, strict=True):
                    theirs.load_state_dict(ours.state_dict())
        for ours, theirs in (
            (model.encoder_norm, transformer.encoder.norm),
            (model.final_norm, transformer.decoder.norm),
        ):
            if theirs is not None and not isinstance(ours, nn.Identity):
                theirs.load_state_dict(ours.state_dict())


def check_torch_compatible(config: TransformerConfig) -> None:
    """A UserError naming the first option ``torch.nn.Transformer`` cannot express. Soft-capped logits and
    zero-initialised projections it honours: they live in the shared head and initialisation."""
    unsupported = [
        (config.activation not in ("relu", "gelu"), f"activation {config.activation}"),
        (config.norm != "layernorm", f"norm {config.norm}"),
        (config.positions == "rotary", "rotary positions"),
        (config.n_kv_heads != config.n_heads, "grouped-query attention (n_kv_heads != n_heads)"),
        (config.activation_checkpointing, "activation checkpointing"),
        (config.qk_norm, "QK-norm (qk_norm)"),
    ]
    for failed, option in unsupported:
        if failed:
            raise UserError(f"the torch implementation (torch.nn.Transformer) has no {option}: use implementation xlab")
