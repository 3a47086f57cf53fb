"""The optimiser loop both stages share: AdamW, linear warm-up then cosine decay, gradient
clipping, a progress bar."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm


class Trainer:
    def __init__(self, params: list[torch.nn.Parameter], lr: float, steps: int, desc: str,
                 progress: bool = True, warmup: float = 0.05, clip: float = 1.0) -> None:
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
        warm = max(1, int(steps * warmup))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
            (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
        self.clip = clip
        self.losses: list[float] = []
        self.bar = tqdm(total=steps, desc=desc, disable=not progress, mininterval=2.0)

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        value = float(loss.detach())
        self.losses.append(value)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{value:.3f}")
        if len(self.losses) == self.bar.total:
            self.bar.close()
        return value
