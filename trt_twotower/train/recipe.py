"""The built-in TwoTower's recipe: its configuration, both stages, and the checkpoint.

Deterministic given the seed (single-threaded data sampling, seeded generators); the full
scale runs within 30 minutes on a 2-core CPU, the toy scale in seconds (CI).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import TwoTowerConfig
from ..reference.init import initialise
from ..reference.loading import save_model
from ..reference.model import TwoTowerModel
from ..tokenizer import builtin_tokenizer
from .ar import train_ar
from .corpus import token_stream
from .diffusion import initialise_denoiser_from_backbone, train_denoiser

BUILTIN_CONFIG = TwoTowerConfig(
    vocab_size=1024, hidden_size=128, hybrid_override_pattern="M*EM-EM*E",
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2, conv_kernel=4,
    chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=128, n_shared_experts=1, intermediate_size=256,
    routed_scaling_factor=2.5, max_position_embeddings=4096, torch_dtype="float32",
)

TOY_CONFIG = BUILTIN_CONFIG.replace(hidden_size=32, hybrid_override_pattern="M*E-",
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                                    chunk_size=4, moe_intermediate_size=16,
                                    moe_shared_expert_intermediate_size=16,
                                    intermediate_size=32)


@dataclass(frozen=True)
class Scale:
    config: TwoTowerConfig
    corpus_tokens: int
    ar_steps: int
    ar_batch: int
    seq_len: int
    denoiser_steps: int
    denoiser_batch: int
    denoiser_window: int
    block: int = 16
    ar_lr: float = 3e-3
    denoiser_lr: float = 1.5e-3


SCALES = {
    "full": Scale(BUILTIN_CONFIG, corpus_tokens=2_000_000, ar_steps=1200, ar_batch=16,
                  seq_len=128, denoiser_steps=800, denoiser_batch=32, denoiser_window=128,
                  denoiser_lr=3e-3),
    "toy": Scale(TOY_CONFIG, corpus_tokens=20_000, ar_steps=12, ar_batch=4, seq_len=32,
                 denoiser_steps=12, denoiser_batch=4, denoiser_window=32, block=8),
}


def run_recipe(out_dir: Path, scale: str = "full", seed: int = 0, progress: bool = True
               ) -> dict:
    """Train both stages and write the checkpoint (config, safetensors, tokenizer, log)."""
    s = SCALES[scale]
    torch.manual_seed(seed)
    tokenizer = builtin_tokenizer()
    start = time.perf_counter()
    stream = token_stream(tokenizer, "train", max_tokens=s.corpus_tokens)
    model = initialise(TwoTowerModel(s.config), seed).train()
    ar_losses = train_ar(model, stream, s.ar_steps, s.ar_batch, s.seq_len, s.ar_lr, seed,
                         progress)
    ar_seconds = time.perf_counter() - start
    initialise_denoiser_from_backbone(model)
    den_losses = train_denoiser(model, stream, s.denoiser_steps, s.denoiser_batch,
                                s.denoiser_window, s.block, s.denoiser_lr, seed + 1, progress)
    total = time.perf_counter() - start
    model.eval().requires_grad_(False)
    out_dir = Path(out_dir)
    # bf16 storage halves the committed file; config.json keeps float32, so every command
    # computes in float32 from exactly these (bf16-representable) weights
    save_model(model.to_dtype(torch.bfloat16), out_dir)
    tokenizer.save(out_dir)
    log = {"scale": scale, "seed": seed, "corpus_tokens": len(stream),
           "ar_seconds": round(ar_seconds, 1), "total_seconds": round(total, 1),
           "threads": torch.get_num_threads(), "recipe": {k: v for k, v in asdict(s).items()
                                                          if k != "config"},
           "ar_loss_first_last": [ar_losses[0], sum(ar_losses[-20:]) / len(ar_losses[-20:])],
           "denoiser_loss_first_last": [den_losses[0],
                                        sum(den_losses[-20:]) / len(den_losses[-20:])]}
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return {"log": log, "ar_losses": ar_losses, "denoiser_losses": den_losses,
            "model": model}
