"""The runtime's cache: every tower-state tensor of a batch, preallocated to ``max_context``
positions, named as the step graphs name them (``trt_twotower.names``), with a valid length per
row. Shapes never change while a request runs; rows leave when their requests finish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import names
from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from ..names import FLOAT32, MODEL


class CacheFullError(TwoTowerError, RuntimeError):
    """A request would write past the cache's preallocated length."""


@dataclass
class StepCache:
    tensors: dict[str, torch.Tensor]
    lengths: torch.Tensor            # [B] int64, on the cache's device
    max_context: int

    @classmethod
    def allocate(cls, config: TwoTowerConfig, batch: int, max_context: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "StepCache":
        tensors = {}
        for spec in names.context_cache_inputs(config, max_context):
            shape = tuple(batch if d == names.BATCH else d for d in spec.shape)
            t_dtype = torch.float32 if spec.dtype == FLOAT32 else dtype
            assert spec.dtype in (MODEL, FLOAT32)
            tensors[spec.name] = torch.zeros(shape, dtype=t_dtype, device=device)
        return cls(tensors, torch.zeros(batch, dtype=torch.int64, device=device), max_context)

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def check_room(self, tokens: int) -> None:
        longest = int(self.lengths.max()) + tokens if self.batch else tokens
        if longest > self.max_context:
            raise CacheFullError(
                f"{longest} tokens exceed the cache's maximum context of {self.max_context}; "
                "use a shorter prompt or fewer new tokens, or build with a larger --max-context")

    def mamba_names(self) -> list[str]:
        return [n for n in self.tensors if n.startswith(("conv_state.", "ssm_state."))]

    def kv_names(self) -> list[str]:
        return [n for n in self.tensors if n.startswith(("past_key.", "past_value."))]

    def snapshot_mamba(self) -> dict[str, torch.Tensor]:
        """The Mamba states now: mock-AR's "S−2" view needs them one token later."""
        return {n: self.tensors[n].clone() for n in self.mamba_names()}

    def one_token_back(self, mamba: dict[str, torch.Tensor]) -> "StepCache":
        """A read-only view: the given Mamba states, the same KV, each length minus one."""
        tensors = dict(self.tensors)
        tensors.update(mamba)
        return StepCache(tensors, self.lengths - 1, self.max_context)

    def select_rows(self, rows: list[int]) -> "StepCache":
        """A new cache of these rows only (finished or cancelled rows leave the batch)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return StepCache({n: t.index_select(0, index) for n, t in self.tensors.items()},
                         self.lengths.index_select(0, index), self.max_context)

    def to(self, device: torch.device | str) -> "StepCache":
        """This cache on ``device`` (itself when it is there already): what a denoiser on
        another GPU reads, since an executor refuses tensors of a device it does not run on."""
        device = torch.device(device)
        if self.device == device:
            return self
        return StepCache({n: t.to(device) for n, t in self.tensors.items()},
                         self.lengths.to(device), self.max_context)

    def row(self, r: int) -> "StepCache":
        """A view of one row: writes through it land in this cache."""
        return StepCache({n: t[r:r + 1] for n, t in self.tensors.items()},
                         self.lengths[r:r + 1], self.max_context)
