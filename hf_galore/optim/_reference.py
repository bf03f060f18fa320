"""Slow, obviously-correct reference implementations, used only by the tests.

Written straight from the paper's equations, sharing no code with the fast path: one full fp32 SVD per refresh,
explicit bias correction, explicit projection and back-projection, no fusion and no in-place tricks.
"""

from __future__ import annotations

import math

import torch


def reference_canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Column by column: flip so the entry of largest magnitude is positive."""
    out = basis.clone()
    for j in range(out.shape[1]):
        i = int(out[:, j].abs().argmax())
        if out[i, j] < 0:
            out[:, j] = -out[:, j]
    return out


def reference_bases(grad: torch.Tensor, side: str, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(P, Q)` from one full SVD G = U S Vᵀ: P = U[:, :r] (left), Q = V[:, :r] (right)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    p = reference_canonical_signs(u[:, :rank]) if side in ("left", "both") else None
    q = reference_canonical_signs(vh[:rank].T) if side in ("right", "both") else None
    return p, q


def reference_side(shape: tuple[int, int], proj_type: str, rank: int) -> str:
    """The side table of the GaLore reference implementation, written out case by case."""
    m, n = shape
    if rank >= min(m, n):
        return "none"
    table = {
        ("std", True): "left",
        ("std", False): "right",
        ("reverse_std", True): "right",
        ("reverse_std", False): "left",
        ("left", True): "left",
        ("left", False): "left",
        ("right", True): "right",
        ("right", False): "right",
        ("full", True): "both",
        ("full", False): "both",
    }
    return table[(proj_type, m < n)]


def reference_project(grad: torch.Tensor, side: str, p, q) -> torch.Tensor:
    if side == "left":
        return torch.matmul(p.T, grad)
    if side == "right":
        return torch.matmul(grad, q)
    return torch.matmul(torch.matmul(p.T, grad), q)


def reference_project_back(low: torch.Tensor, side: str, p, q) -> torch.Tensor:
    if side == "left":
        return torch.matmul(p, low)
    if side == "right":
        return torch.matmul(low, q.T)
    return torch.matmul(torch.matmul(p, low), q.T)


class ReferenceGaLoreAdamW:
    """GaLore-Adam on a list of 2-D weights, one at a time, with exact SVD refreshes at steps 0, T, 2T, ...

    Projected weights: W ← W(1 − lr·wd) − lr·α·Back(M̂ / (√V̂ + ε)), with M, V the Adam moments of the projected
    gradient. Weights with rank ≥ min(m, n) and `project=False` ones get plain AdamW.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=4, update_proj_gap=200,
                 scale=1.0, proj_type="std", project=None):  # fmt: skip
        self.params = list(params)
        self.project = project if project is not None else [True] * len(self.params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank, self.gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.state: list[dict] = [{} for _ in self.params]

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for i, w in enumerate(self.params):
            g = w.grad.float()
            st = self.state[i]
            side = reference_side(tuple(w.shape), self.proj_type, self.rank) if self.project[i] else "none"
            if side != "none":
                t = st.get("t", 0)
                if t % self.gap == 0:
                    st["P"], st["Q"] = reference_bases(g, side, self.rank)
                g = reference_project(g, side, st["P"], st["Q"])
            st["t"] = st.get("t", 0) + 1
            t = st["t"]
            st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
            st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
            m_hat = st["m"] / (1 - b1**t)
            v_hat = st["v"] / (1 - b2**t)
            direction = m_hat / (torch.sqrt(v_hat) + self.eps)
            if side != "none":
                direction = self.scale * reference_project_back(direction, side, st["P"], st["Q"])
            new_w = w.float() * (1 - self.lr * self.wd) - self.lr * direction
            w.copy_(new_w)


class ReferenceGaLoreAdafactor:
    """GaLore-Adafactor (no momentum, fixed lr): factored second moment of the projected gradient."""

    def __init__(self, params, lr, rank=4, update_proj_gap=200, scale=1.0, proj_type="std", eps1=1e-30,
                 clip_threshold=1.0, decay_rate=-0.8):  # fmt: skip
        self.params = list(params)
        self.lr, self.rank, self.gap, self.scale, self.proj_type = lr, rank, update_proj_gap, scale, proj_type
        self.eps1, self.clip, self.decay = eps1, clip_threshold, decay_rate
        self.state: list[dict] = [{} for _ in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for i, w in enumerate(self.params):
            st = self.state[i]
            side = reference_side(tuple(w.shape), self.proj_type, self.rank)
            g = w.grad.float()
            if st.get("t", 0) % self.gap == 0:
                st["P"], st["Q"] = reference_bases(g, side, self.rank)
            g = reference_project(g, side, st["P"], st["Q"])
            st["t"] = st.get("t", 0) + 1
            beta2 = 1.0 - st["t"] ** self.decay
            sq = g * g + self.eps1
            st["row"] = beta2 * st.get("row", torch.zeros(g.shape[0])) + (1 - beta2) * sq.mean(dim=1)
            st["col"] = beta2 * st.get("col", torch.zeros(g.shape[1])) + (1 - beta2) * sq.mean(dim=0)
            v_hat = torch.outer(st["row"], st["col"]) / st["row"].mean()
            update = g / torch.sqrt(v_hat)
            update_rms = math.sqrt(float((update * update).mean()))
            update = update / max(1.0, update_rms / self.clip)
            w.copy_(w - self.lr * self.scale * reference_project_back(update, side, st["P"], st["Q"]))
