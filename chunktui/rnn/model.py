"""The paper's small RNN, with tanh and GRU variants, as a stack of replicas.

Every cell reads ``z_t = [x_t; h_{t-1}]`` (one-hot input concatenated with the
previous state) and

* predicts the NEXT symbol from ``z_t``:  ``logits_t = W_y z_t + b_y``;
* updates the state:
  - ``linear`` (the paper's): ``h_t = W_h z_t + b_h``
  - ``tanh``:                 ``h_t = tanh(W_h z_t + b_h)``
  - ``gru``:  ``u = σ(W_u z_t + b_u)``, ``r = σ(W_r z_t + b_r)``,
    ``n = tanh(W_n [x_t; r ⊙ h_{t-1}] + b_n)``, ``h_t = (1-u) ⊙ n + u ⊙ h_{t-1}``.

So ``h_t`` is the state reached AFTER reading ``x_t``; writing a state into
``h_{t-1}`` and feeding ``x_t`` is grafting.

Parameters carry a leading replica axis ``R``: ``R`` independent networks
(e.g. one per seed, or both arms of an experiment) run in one batched matmul.
Because Adam is element-wise and the training loss is a sum of per-replica
losses, replicas train exactly as they would alone. Shapes below use
``V`` symbols, ``H`` hidden units, ``B`` batch, ``T`` time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CELLS = ("linear", "tanh", "gru")


class ReflectionRNN(nn.Module):
    def __init__(self, n_symbols: int, hidden: int = 12, cell: str = "linear",
                 replicas: int = 1, seed: int = 0) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.n_symbols, self.hidden, self.cell, self.replicas = n_symbols, hidden, cell, replicas
        gen = torch.Generator().manual_seed(seed)
        fan_in = n_symbols + hidden
        bound = 1.0 / math.sqrt(fan_in)  # PyTorch's nn.Linear default range

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(replicas, *shape, generator=gen) * 2 - 1) * bound)

        self.W_y, self.b_y = param(n_symbols, fan_in), param(n_symbols)  # readout (R,V,V+H), (R,V)
        gates = 3 if cell == "gru" else 1   # gru: update u, reset r, candidate n stacked
        self.W_h, self.b_h = param(gates * hidden, fan_in), param(gates * hidden)  # (R,G*H,V+H)

    def init_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(self.replicas, batch, self.hidden, device=self.W_h.device)

    def forward(self, symbols: torch.Tensor, h0: torch.Tensor | None = None,
                graft_mask: torch.Tensor | None = None,
                graft_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run over ``symbols`` (R,B,T) int64.

        ``graft_mask`` (R,B,T) bool: where true, ``h_{t-1}`` is replaced by
        ``graft_state`` (shape (R,H) or (R,B,T,H)) before step ``t`` reads it.

        Returns ``logits`` (R,B,T,V) -- ``logits[..., t, :]`` predicts symbol
        ``t+1`` -- and ``states`` (R,B,T,H), ``states[..., t, :] = h_t``.
        """
        R, B, T = symbols.shape
        H, V = self.hidden, self.n_symbols
        x = nn.functional.one_hot(symbols, V).to(self.W_h.dtype)          # (R,B,T,V)
        Wx, Wh = self.W_h[..., :V], self.W_h[..., V:]                      # (R,G*H,V), (R,G*H,H)
        # Input parts of every pre-activation, for all t at once: (R,B,T,G*H).
        x_proj = torch.einsum("rbtv,rgv->rbtg", x, Wx) + self.b_h[:, None, None, :]
        h = self.init_state(B) if h0 is None else h0
        if graft_state is not None and graft_state.dim() == 2:
            graft_state = graft_state[:, None, None, :].expand(R, B, T, H)
        prev_states, states = [], []
        for t in range(T):
            if graft_mask is not None:
                h = torch.where(graft_mask[:, :, t, None], graft_state[:, :, t], h)
            prev_states.append(h)
            xp = x_proj[:, :, t]                                           # (R,B,G*H)
            if self.cell == "gru":
                Wh_ur, Wh_n = Wh[:, : 2 * H], Wh[:, 2 * H :]
                ur = torch.sigmoid(xp[..., : 2 * H] + h @ Wh_ur.transpose(1, 2))
                u, r = ur[..., :H], ur[..., H:]
                n = torch.tanh(xp[..., 2 * H :] + (r * h) @ Wh_n.transpose(1, 2))
                h = (1 - u) * n + u * h
            else:
                pre = xp + h @ Wh.transpose(1, 2)                               # (R,B,H)
                h = torch.tanh(pre) if self.cell == "tanh" else pre
            states.append(h)
        h_prev = torch.stack(prev_states, dim=2)                               # (R,B,T,H)
        z = torch.cat([x, h_prev], dim=-1)                                     # (R,B,T,V+H)
        logits = torch.einsum("rbtk,rvk->rbtv", z, self.W_y) + self.b_y[:, None, None, :]
        return logits, torch.stack(states, dim=2)

    @torch.no_grad()
    def predict_from(self, state: torch.Tensor, symbol: int, replica: int = 0) -> torch.Tensor:
        """Next-symbol probabilities (V,) when ``state`` (H,) is written into
        ``h_{t-1}`` and ``symbol`` is fed: the grafting read-out."""
        V = self.n_symbols
        z = torch.cat([nn.functional.one_hot(torch.tensor(symbol), V).to(state.dtype), state])
        return torch.softmax(self.W_y[replica] @ z + self.b_y[replica], dim=-1)

    def replica(self, i: int) -> "ReflectionRNN":
        """A one-replica copy of replica ``i`` (for analysis and streaming)."""
        one = ReflectionRNN(self.n_symbols, self.hidden, self.cell, replicas=1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                getattr(one, name).copy_(p[i : i + 1])
        return one

    @classmethod
    def stack(cls, nets: list["ReflectionRNN"]) -> "ReflectionRNN":
        """One network whose replicas are copies of ``nets`` (each one-replica, same shape)."""
        first = nets[0]
        out = cls(first.n_symbols, first.hidden, first.cell, replicas=len(nets))
        with torch.no_grad():
            for name, p in out.named_parameters():
                p.copy_(torch.cat([getattr(n, name) for n in nets]))
        return out

    def config(self) -> dict:
        return {"n_symbols": self.n_symbols, "hidden": self.hidden, "cell": self.cell,
                "replicas": self.replicas}
