"""Mamba-2's state-space recurrence (SSD), spec §2.3 step 5, in fp32.

Per head with state S ∈ R^{P×N}:  S_t = exp(dt_t·A)·S_{t−1} + dt_t · x_t ⊗ B_t,
y_t = S_t·C_t + D·x_t. Three forms of the same map: the chunked form for many tokens, the
single step for one token and the plain sequential loop that the tests hold the others to.

Shapes: x [b, L, H, P], dt [b, L, H] (after softplus), A [H] (negative), B and C
[b, L, G, N] with head h using group h // (H / G), D [H], state [b, H, P, N].
"""

from __future__ import annotations

import torch


def expand_groups(bc: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, L, G, N] → [b, L, H, N] with repeat_interleave semantics (head h → group h // (H/G))."""
    return bc.repeat_interleave(heads // bc.shape[2], dim=2)


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x [b, H, P], dt [b, H], B/C [b, G, N] → (y [b, H, P], new state)."""
    heads = x.shape[1]
    Bh = B.repeat_interleave(heads // B.shape[1], dim=1)
    Ch = C.repeat_interleave(heads // C.shape[1], dim=1)
    decay = torch.exp(dt * A)[..., None, None]
    state = decay * state + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D[:, None] * x
    return y, state


def ssd_sequential(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor, state: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token: the definition the chunked form must equal."""
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, D: torch.Tensor, state: torch.Tensor, chunk_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD form: quadratic attention-like products inside each chunk of
    ``chunk_size`` tokens, the recurrence only between chunks. Any length; the tail is padded
    with dt = 0 (decay 1, no input), which leaves the state and outputs untouched."""
    b, length, heads, p = x.shape
    pad = (-length) % chunk_size
    if pad:
        x, B, C = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = torch.nn.functional.pad(dt, (0, 0, 0, pad))
    n_chunks = x.shape[1] // chunk_size
    Bh, Ch = expand_groups(B, heads), expand_groups(C, heads)

    def chunks(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n_chunks, chunk_size, *t.shape[2:])

    xc, dtc, Bc, Cc = chunks(x), chunks(dt), chunks(Bh), chunks(Ch)
    a_cum = torch.cumsum(dtc * A, dim=2)                                    # [b, c, Q, H]
    # decay[i, j] = exp(a_cum[i] − a_cum[j]) for i ≥ j, 0 above the diagonal.
    diff = a_cum[:, :, :, None, :] - a_cum[:, :, None, :, :]                 # [b, c, Qi, Qj, H]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", Cc, Bc) * decay
    y = torch.einsum("bcijh,bcjh,bcjhp->bcihp", scores, dtc, xc)

    to_end = torch.exp(a_cum[:, :, -1:, :] - a_cum)                          # [b, c, Q, H]
    chunk_states = torch.einsum("bcjh,bcjh,bcjhn,bcjhp->bchpn", to_end, dtc, Bc, xc)
    chunk_decay = torch.exp(a_cum[:, :, -1, :])                              # [b, c, H]
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    entering_states = torch.stack(entering, dim=1)                           # [b, c, H, P, N]
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", Cc, entering_states, torch.exp(a_cum))
    y = y.reshape(b, n_chunks * chunk_size, heads, p)[:, :length]
    return y + D[:, None] * x[:, :length], state
