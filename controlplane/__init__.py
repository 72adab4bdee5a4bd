"""EdgeFleet control plane: inventory, classes, model registry, builds and rollouts."""

__version__ = "0.1.0"
