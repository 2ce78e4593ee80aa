"""XLab: a YAML-driven transformer lab built on PyTorch Lightning."""
