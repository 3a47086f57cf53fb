"""Where a model comes from: a checkpoint directory, a named preset (random weights) or the
built-in model that every command uses by default, so the whole pipeline runs on a laptop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import TwoTowerConfig, preset
from ..tokenizer import TwoTowerTokenizer, builtin_tokenizer, load_tokenizer
from .init import initialise
from .loading import load_model
from .model import TwoTowerModel

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_CHECKPOINT = BUILTIN_DIR / "model"   # the trained built-in TwoTower, when shipped
BUILTIN_PRESET = "tiny"                        # random fallback with the built-in tokenizer
PRESET_SEED = 0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """A loaded model, its tokenizer, and a name for reports and manifests."""

    model: TwoTowerModel
    tokenizer: TwoTowerTokenizer
    name: str
    checkpoint_dir: Optional[Path] = None

    @property
    def config(self) -> TwoTowerConfig:
        return self.model.config


def builtin_checkpoint() -> Optional[Path]:
    """The shipped trained checkpoint, if this installation has one."""
    return BUILTIN_CHECKPOINT if (BUILTIN_CHECKPOINT / "config.json").is_file() else None


def random_model(config: TwoTowerConfig, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = PRESET_SEED) -> TwoTowerModel:
    model = initialise(TwoTowerModel(config), seed).to_dtype(dtype).to(device)
    return model.eval().requires_grad_(False)


def open_source(checkpoint: Optional[Path] = None, preset_name: Optional[str] = None,
                dtype: Optional[str] = None, context_device: str = "cpu",
                denoiser_device: Optional[str] = None,
                towers: tuple[str, ...] = ("context", "denoiser")) -> ModelSource:
    """Resolve --checkpoint / --preset / the built-in default into a ready model (of a
    checkpoint, only the ``towers`` asked for are loaded)."""
    if checkpoint is not None and preset_name is not None:
        raise ValueError("give either a checkpoint directory or a preset, not both")
    torch_dtype = DTYPES[dtype] if dtype else None
    if checkpoint is None and preset_name is None:
        checkpoint = builtin_checkpoint()
        if checkpoint is None:
            preset_name = BUILTIN_PRESET
    if preset_name is not None:
        model = random_model(preset(preset_name), torch_dtype or torch.float32, context_device)
        return ModelSource(model, builtin_tokenizer(), f"preset:{preset_name}")
    model = load_model(checkpoint, dtype=torch_dtype, context_device=context_device,
                       denoiser_device=denoiser_device, towers=towers
                       ).eval().requires_grad_(False)
    tokenizer = load_tokenizer(checkpoint)
    return ModelSource(model, tokenizer, str(checkpoint), Path(checkpoint))
