"""The genomic bottleneck in-process: predicted weights, their gradients, tiling, counts, the cache, the optimizer
groups and clipping, fitting to a dense model."""

import math

import pytest
import torch
from torch.nn.utils import parametrize

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder
from xlab.models.genomic import GenomicBottleneck, LowRank
from xlab.models.genomic.fit import fit_genome
from xlab.models.genomic.genome import Genome, Predict
from xlab.models.lm import LanguageModel
from xlab.models.losses import next_token_loss
from xlab.models.network import build_network
from xlab.models.transforms import materialize

CONFIG = TransformerConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2)
LAYOUTS = [
    {"tile": (16, 16), "width": 8},
    {"tile": (12, 10), "width": 8, "layout": "shared", "encoding": "gray", "depth": 2},
    {"tile": (16, 16), "width": 4, "encoding": "fourier", "chunk_tiles": 3},
]


def tokens(seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("settings", LAYOUTS)
def test_the_forward_equals_a_plain_model_loaded_with_the_materialised_weights(settings: dict):
    torch.manual_seed(0)
    network = build_network(Decoder, CONFIG, [GenomicBottleneck(**settings, include=["*_proj.weight", "embed.weight"])])
    with torch.no_grad():
        reference = network(tokens())
    plain = Decoder(CONFIG)
    plain.load_state_dict(materialize(network).state_dict())
    with torch.no_grad():
        assert torch.equal(plain(tokens()), reference)
    assert not any(parametrize.is_parametrized(module) for module in network.modules())
    assert network.head.weight is network.embed.weight  # the tie survives folding


def test_a_low_rank_network_folds_into_a_plain_one_with_the_same_function():
    torch.manual_seed(0)
    network = build_network(Decoder, CONFIG, [LowRank(rank=3)])
    assert network.blocks[0].mlp.in_proj.weight.shape == (128, 32)
    assert torch.linalg.matrix_rank(network.blocks[0].mlp.in_proj.weight.detach()) == 3
    with torch.no_grad():
        reference = network(tokens())
    plain = Decoder(CONFIG)
    plain.load_state_dict(materialize(network).state_dict())
    with torch.no_grad():
        assert torch.equal(plain(tokens()), reference)


def test_chunked_prediction_equals_the_prediction_all_at_once_and_so_do_its_gradients():
    torch.manual_seed(0)
    whole = Genome([(40, 24), (16, 50)], [0, 1], [0, 1], (8, 8), layout="shared", width=6, depth=2)
    chunked = Genome([(40, 24), (16, 50)], [0, 1], [0, 1], (8, 8), layout="shared", width=6, depth=2, chunk_tiles=4)
    chunked.load_state_dict(whole.state_dict())
    outputs = [genome.predicted() for genome in (whole, chunked)]
    torch.testing.assert_close(outputs[0], outputs[1])
    weights = torch.randn_like(outputs[0])
    for output in outputs:
        (output * weights).sum().backward()
    for first, second in zip(whole.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(first.grad, second.grad)


@pytest.mark.parametrize("settings", LAYOUTS)
def test_genome_gradients_equal_finite_differences(settings: dict):
    torch.manual_seed(0)
    options = {**settings, "tile": (4, 3), "width": 3}
    genome = Genome([(5, 7), (3, 4), (8, 3)], [0, 1, 0], [0, 0, 1], **options).double()
    parameters = list(genome.parameters())
    assert torch.autograd.gradcheck(lambda *ps: Predict.apply(genome, *ps), parameters)


def test_a_matrix_that_tiles_do_not_divide_is_cut_from_its_tiles_and_cropped():
    torch.manual_seed(0)
    genome = Genome([(3, 3), (5, 7)], [0, 1], [0, 0], (4, 3))
    assert genome.grids == [(1, 1), (2, 3)] and genome.tiles == 7
    with torch.no_grad():
        tiles = genome(1, 7)  # the second matrix's six tiles
        matrix = genome.matrix(1)
    entry = [[tiles[(r // 4) * 3 + c // 3, (r % 4) * 3 + c % 3].item() for c in range(7)] for r in range(5)]
    expected = torch.tensor(entry)
    assert torch.equal(matrix, expected)


def hand_counted_config() -> TransformerConfig:
    return TransformerConfig(vocab_size=64, context_length=8, d_model=32, n_layers=1, n_heads=2)


def test_the_compression_counts_equal_a_count_by_hand():
    config = hand_counted_config()  # d_ff 128; q 32x32, kv 64x32, out 32x32, MLP 128x32 and 32x128
    replaced = 32 * 32 + 64 * 32 + 32 * 32 + 128 * 32 + 32 * 128
    dense = 64 * 32 + 8 * 32 + replaced + (32 + 64 + 32 + 128 + 32) + 2 * 64 + 64  # embeddings, biases, norms
    assert dense == sum(p.numel() for p in Decoder(config).parameters())  # the head is tied: counted once
    # 16x16 tiles: 4 + 8 + 4 + 16 + 16 of them; 4 + 4 binary inputs, 4 hidden units, one output; a gain per matrix
    per_tile = 48 * (8 * 4 + 4 + 4 + 1) + 5
    # one g-net: in-tile 8, tile row and column 3 + 3 bits, 5 kinds one-hot, 1 layer bit
    shared = (8 + 12) * 4 + 4 + 4 + 1 + 5
    for layout, genome in (("per_tile", per_tile), ("shared", shared)):
        transform = GenomicBottleneck(tile=(16, 16), width=4, layout=layout)
        report = transform.report(build_network(Decoder, config, [transform]))
        assert report == {
            "matrices": 5,
            "replaced": replaced,
            "stored": genome,
            "dense": dense,
            "compressed": dense - replaced + genome,
            "ratio": replaced / genome,
            "model_ratio": dense / (dense - replaced + genome),
        }
    low_rank = LowRank(rank=2)
    report = low_rank.report(build_network(Decoder, config, [low_rank]))
    assert report["stored"] == 2 * (64 + 96 + 64 + 160 + 160) and report["dense"] == dense


def test_a_tied_embedding_is_predicted_once_and_counted_once():
    transform = GenomicBottleneck(tile=(16, 16), width=4, include=["head.weight"])
    network = build_network(Decoder, hand_counted_config(), [transform])
    assert transform.report(network)["replaced"] == 64 * 32 and network.genome.shapes == [(64, 32)]
    assert torch.equal(network.head.weight, network.embed.weight)


def test_a_pattern_matching_nothing_and_a_genome_larger_than_its_matrices_are_clear_errors():
    with pytest.raises(UserError, match="the pattern 'blocks.*.nope' matches no parameter of the Decoder"):
        build_network(Decoder, CONFIG, [GenomicBottleneck(include=["*_proj.weight", "blocks.*.nope"])])
    with pytest.raises(UserError, match=r"genomic transform \(per_tile, width 512\): its [\d,]+ parameters exceed"):
        build_network(Decoder, CONFIG, [GenomicBottleneck(tile=(8, 8), width=512)])


def test_predicted_weights_start_at_the_dense_initial_scale_and_loss():
    batch = tokens(3, 512)
    config = TransformerConfig(vocab_size=512, context_length=16, d_model=64, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    dense = build_network(Decoder, config)
    for settings in ({"tile": (32, 32)}, {"tile": (32, 32), "layout": "shared", "width": 64}):
        torch.manual_seed(0)
        genomic = build_network(Decoder, config, [GenomicBottleneck(**settings)])
        with torch.no_grad():
            for name, weight in dense.named_parameters():
                if name.endswith("_proj.weight"):
                    module = genomic.get_submodule(name.removesuffix(".weight"))
                    assert module.parametrizations.weight.original.numel() == 0
                    rms = module.weight.square().mean().sqrt().item()
                    assert rms == pytest.approx(weight.square().mean().sqrt().item(), rel=1e-4)
            losses = [next_token_loss(net(batch[:, :-1]), batch[:, 1:]).item() for net in (dense, genomic)]
        assert abs(losses[0] - losses[1]) < 0.05 and losses[0] == pytest.approx(math.log(512), abs=0.2)


def test_the_optimizer_holds_every_genome_parameter_and_no_predicted_weight():
    transform = GenomicBottleneck(tile=(16, 16), width=8, lr=0.01, weight_decay=0.05, clip=0.5)
    model = LanguageModel(CONFIG, transforms=[transform])
    groups = {group["name"]: group for group in model.parameter_groups()}
    optimizer = torch.optim.AdamW(list(groups.values()))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    genome = model.model.genome
    assert {id(p) for p in groups["genome"]["params"]} == {id(p) for p in genome.parameters()}
    assert (groups["genome"]["lr"], groups["genome"]["weight_decay"], groups["genome"]["clip"]) == (0.01, 0.05, 0.5)
    assert held == {id(p) for p in model.parameters()}
    predicted = [m.weight for m in model.model.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(predicted) == 2 * 5 and not {id(w) for w in predicted} & held
    assert not any("original" in name or "genome" in name and "parametrizations" in name for name in model.state_dict())
    assert not [name for name, _ in model.named_parameters() if "parametrizations" in name]


def test_a_genome_group_is_clipped_on_its_own_and_left_out_of_the_trainers_clipping():
    model = LanguageModel(CONFIG, transforms=[GenomicBottleneck(tile=(16, 16), width=8, clip=0.5)])
    optimizer = torch.optim.AdamW(model.parameter_groups())
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 3.0)
    model.configure_gradient_clipping(optimizer, 2.0, "norm")
    genome = list(model.model.genome.parameters())
    rest = [p for p in model.parameters() if all(p is not g for g in genome)]
    for parameters, limit in ((genome, 0.5), (rest, 2.0)):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        assert norm.item() == pytest.approx(limit, rel=1e-5)


@pytest.mark.parametrize("chunk_tiles", [None, 5])
def test_micro_batches_share_one_prediction_and_their_gradients_add_up(chunk_tiles: int | None):
    torch.manual_seed(0)
    network = build_network(Decoder, CONFIG, [GenomicBottleneck(tile=(16, 16), width=8, chunk_tiles=chunk_tiles)])
    genome = network.genome
    batches = [tokens(1), tokens(2)]

    def loss(batch: torch.Tensor) -> torch.Tensor:
        return next_token_loss(network(batch[:, :-1]), batch[:, 1:])

    separate = []
    for batch in batches:  # the reference: a fresh prediction for each micro-batch
        genome._cached = None
        genome.zero_grad()
        loss(batch).backward()
        separate.append([p.grad.clone() for p in genome.parameters()])
    genome._cached, before = None, genome.predictions
    genome.zero_grad()
    for batch in batches:
        loss(batch).backward()
    assert genome.predictions == before + 1
    for accumulated, first, second in zip((p.grad for p in genome.parameters()), *separate, strict=True):
        torch.testing.assert_close(accumulated, first + second, rtol=1e-5, atol=1e-8)
    torch.optim.SGD(genome.parameters(), lr=0.1).step()
    with torch.no_grad():
        network(batches[0])
        network(batches[1])
    assert genome.predictions == before + 2  # repredicted once after the step, then cached for evaluation


@pytest.mark.parametrize("network_class", [EncoderDecoder, TorchEncoderDecoder])
def test_both_translator_implementations_predict_their_block_matrices(network_class: type):
    config = TransformerConfig(
        vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2, positions="sinusoidal"
    )
    torch.manual_seed(0)
    network = build_network(network_class, config, [GenomicBottleneck(tile=(16, 16), width=4)])
    # encoder: self-attention (XLab: q, kv, out; torch: in_proj, out) and MLP (2); decoder: self, cross and MLP
    assert len(network.genome.shapes) == (5 + 8 if network_class is EncoderDecoder else 4 + 6)
    source, target = tokens(4), tokens(5)
    with torch.no_grad():
        reference = network.eval()(source, target)
        # torch's layers may take their fused inference path for one and not the other: equal to rounding
        torch.testing.assert_close(materialize(network)(source, target), reference, rtol=1e-5, atol=1e-6)


def test_a_genome_fitted_to_a_dense_model_approaches_its_matrices():
    torch.manual_seed(0)
    dense = build_network(Decoder, CONFIG)
    torch.manual_seed(1)
    network = build_network(Decoder, CONFIG, [GenomicBottleneck(tile=(16, 16), width=16)])
    names = [name for name, _ in dense.named_parameters() if name.endswith("_proj.weight")]
    targets = [dense.get_parameter(name).detach() for name in names]
    start = fit_genome(network.genome, targets, steps=0, lr=1e-2)
    fitted = fit_genome(network.genome, targets, steps=60, lr=1e-2)
    assert min(start) > 0.9 and max(fitted) < 0.9 * min(start)
    assert all(p.grad is None for p in network.genome.parameters())
