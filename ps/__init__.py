"""The zmqps parameter server: holds θ, aggregates gradients, applies torch.optim, checkpoints."""

from ps.server import Server

__all__ = ["Server"]
