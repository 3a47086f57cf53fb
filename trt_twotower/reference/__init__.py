"""The PyTorch reference of both TwoTower towers: the ground truth every other stage is
measured against (spec §2–§5)."""

from .cache import TowerCache
from .generate import GenerationResult, generate
from .model import TwoTowerModel

__all__ = ["TowerCache", "TwoTowerModel", "GenerationResult", "generate"]
