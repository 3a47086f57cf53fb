"""Shared fixtures: small random TwoTower models in fp32 (fixed seeds, non-zero weights)."""

from __future__ import annotations

import pytest
import torch

from trt_twotower.config import TwoTowerConfig, preset
from trt_twotower.reference import TwoTowerModel
from trt_twotower.reference.init import initialise


def random_model(config: TwoTowerConfig, seed: int = 0) -> TwoTowerModel:
    return initialise(TwoTowerModel(config), seed).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_config() -> TwoTowerConfig:
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config: TwoTowerConfig) -> TwoTowerModel:
    return random_model(tiny_config, seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
