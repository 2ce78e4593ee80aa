"""Starting a genome from a trained dense model: regression of the predicted matrices on its weights."""

from typing import Protocol

import torch
from torch import Tensor, nn

from xlab.errors import UserError
from xlab.models.genomic.genome import Genome


class FitSettings(Protocol):
    init_from: str
    fit_steps: int
    fit_lr: float


def fit_to_checkpoint(network: nn.Module, genome: Genome, names: list[list[str]], settings: FitSettings) -> None:
    """Copy the uncompressed weights of the dense model at ``settings.init_from`` into ``network`` and fit
    ``genome`` to its matrices (``names``: each predicted matrix's names, in the genome's order)."""
    from xlab.checkpoint import load  # checkpoint loading builds networks, so it imports the models

    dense = load(settings.init_from).model.state_dict()
    targets = [_weight(dense, matrix, settings.init_from) for matrix in names]
    predicted = {name for matrix in names for name in matrix}
    rest = {name: tensor for name, tensor in dense.items() if name not in predicted}
    missing, unexpected = network.load_state_dict(rest, strict=False)
    if unexpected or [name for name in missing if not name.startswith("genome.")]:
        raise UserError(f"{settings.init_from} is not a dense model of the configured architecture")
    fit_genome(genome, targets, settings.fit_steps, settings.fit_lr)


def _weight(dense: dict[str, Tensor], names: list[str], origin: str) -> Tensor:
    found = next((dense[name] for name in names if name in dense), None)
    if found is None:
        raise UserError(f"{origin} has no {names[0]}: it is not a dense model of the configured architecture")
    return found.float()


def fit_genome(genome: Genome, targets: list[Tensor], steps: int, lr: float) -> list[float]:
    """Adam on the genome for ``steps`` steps, minimising the mean over matrices of the squared error relative
    to each target's mean square; returns each matrix's relative error after the last step."""
    optimizer = torch.optim.Adam(genome.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            relative_errors(genome, targets).mean().backward()
            optimizer.step()
    genome.zero_grad(set_to_none=True)
    with torch.no_grad():
        return relative_errors(genome, targets).tolist()


def relative_errors(genome: Genome, targets: list[Tensor]) -> Tensor:
    """Each predicted matrix's mean squared error over its target's mean square."""
    return torch.stack(
        [
            (genome.matrix(index) - target).square().mean() / target.square().mean().clamp_min(1e-12)
            for index, target in enumerate(targets)
        ]
    )
