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


def reference_bases(
    grad: torch.Tensor, side: str, rank: int, signs: str = "canonical"
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(P, Q)` from one full SVD G = U S Vᵀ: P = U[:, :r] (left), Q = V[:, :r] (right).

    `signs="svd"` keeps the SVD's signs, as galore-torch does; any other value flips each column so its
    largest-magnitude entry is positive (`aligned`/`rotate` then realign them, see `reference_aligned`).
    """
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    fix = torch.clone if signs == "svd" else reference_canonical_signs
    p = fix(u[:, :rank]) if side in ("left", "both") else None
    q = fix(vh[:rank].T) if side in ("right", "both") else None
    return p, q


def reference_aligned(new: torch.Tensor | None, old: torch.Tensor | None) -> torch.Tensor | None:
    """Column by column: flip a new basis vector whose dot product with the old one of the same index is negative."""
    if new is None or old is None:
        return new
    out = new.clone()
    for j in range(out.shape[1]):
        if float(torch.dot(out[:, j], old[:, j])) < 0:
            out[:, j] = -out[:, j]
    return out


def reference_side(shape: tuple[int, int], proj_type: str, rank: int, full_basis: bool = False) -> str:
    """The side table of the GaLore reference implementation, written out case by case.

    A weight with rank ≥ min(m, n) is `"none"` (not projected), unless `full_basis`: galore-torch projects it all
    the same, with a basis of all min(m, n) singular vectors.
    """
    m, n = shape
    if rank >= min(m, n) and not full_basis:
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
    gradient. `project=False` weights get plain AdamW. Weights with rank ≥ min(m, n) get plain AdamW with its
    direction multiplied by α (hf_galore's rule), or, with `full_basis=True`, are projected on all their singular
    vectors (galore-torch's behaviour). `signs` is the basis sign convention (`svd`, `canonical`, `aligned`,
    `rotate`, as `refresh_signs`); galore-torch is `signs="svd", full_basis=True`.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=4, update_proj_gap=200,
                 scale=1.0, proj_type="std", project=None, signs="rotate", full_basis=False):  # fmt: skip
        self.params = list(params)
        self.project = project if project is not None else [True] * len(self.params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank, self.gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.signs, self.full_basis = signs, full_basis
        self.state: list[dict] = [{} for _ in self.params]

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for i, w in enumerate(self.params):
            g = w.grad.float()
            st = self.state[i]
            shape = tuple(w.shape)
            side = reference_side(shape, self.proj_type, self.rank, self.full_basis) if self.project[i] else "none"
            if side != "none":
                t = st.get("t", 0)
                if t % self.gap == 0:
                    p_new, q_new = reference_bases(g, side, min(self.rank, *shape), self.signs)
                    if self.signs in ("aligned", "rotate") and "P" in st:
                        p_new, q_new = reference_aligned(p_new, st["P"]), reference_aligned(q_new, st["Q"])
                    if self.signs == "rotate" and "m" in st:
                        self._rotate(st, p_new, q_new)
                    st["P"], st["Q"] = p_new, q_new
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
            elif self.project[i]:  # too small to project: the plain direction, scaled as a projected one would be
                direction = self.scale * direction
            new_w = w.float() * (1 - self.lr * self.wd) - self.lr * direction
            w.copy_(new_w)

    @staticmethod
    def _rotate(st: dict, p_new, q_new) -> None:
        """Moments into the new basis: coordinates c_old ↦ P_newᵀ P_old c_old (left), c_old Q_oldᵀ Q_new (right);
        V by the squared entries of the same matrices."""
        m, v = st["m"], st["v"]
        if p_new is not None:
            rot = torch.matmul(p_new.T, st["P"])
            m, v = torch.matmul(rot, m), torch.matmul(rot * rot, v)
        if q_new is not None:
            rot = torch.matmul(st["Q"].T, q_new)
            m, v = torch.matmul(m, rot), torch.matmul(v, rot * rot)
        st["m"], st["v"] = m, v


class ReferenceGaLoreAdafactor:
    """GaLore-Adafactor (no momentum, fixed lr): factored second moment of the projected gradient.

    `signs` as in [`ReferenceGaLoreAdamW`]; with `rotate` the statistic along a rotated (rank) axis is mixed by the
    squared entries of the rotation at a refresh, the other one kept.
    """

    def __init__(self, params, lr, rank=4, update_proj_gap=200, scale=1.0, proj_type="std", eps1=1e-30,
                 clip_threshold=1.0, decay_rate=-0.8, signs="rotate"):  # fmt: skip
        self.params = list(params)
        self.lr, self.rank, self.gap, self.scale, self.proj_type = lr, rank, update_proj_gap, scale, proj_type
        self.eps1, self.clip, self.decay, self.signs = eps1, clip_threshold, decay_rate, signs
        self.state: list[dict] = [{} for _ in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for i, w in enumerate(self.params):
            st = self.state[i]
            side = reference_side(tuple(w.shape), self.proj_type, self.rank)
            g = w.grad.float()
            if st.get("t", 0) % self.gap == 0:
                p_new, q_new = reference_bases(g, side, self.rank, self.signs)
                if self.signs in ("aligned", "rotate") and "P" in st:
                    p_new, q_new = reference_aligned(p_new, st["P"]), reference_aligned(q_new, st["Q"])
                if self.signs == "rotate" and "row" in st:
                    if p_new is not None:
                        rot = torch.matmul(p_new.T, st["P"])
                        st["row"] = torch.matmul(rot * rot, st["row"])
                    if q_new is not None:
                        rot = torch.matmul(st["Q"].T, q_new)
                        st["col"] = torch.matmul(st["col"], rot * rot)
                st["P"], st["Q"] = p_new, q_new
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


# ---------------------------------------------------------------------------------------------------- FLoRA
def reference_gaussian(seed: int, dim: int, rank: int) -> torch.Tensor:
    """dim×rank matrix of N(0, 1/rank) entries drawn from a CPU generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, rank, generator=gen) / math.sqrt(rank)


def reference_up(low: torch.Tensor, side: str, proj: torch.Tensor) -> torch.Tensor:
    """Decompression: P C (left) or C Pᵀ (right)."""
    return torch.matmul(proj, low) if side == "left" else torch.matmul(low, proj.T)


def reference_down(full: torch.Tensor, side: str, proj: torch.Tensor) -> torch.Tensor:
    """Compression: Pᵀ G (left) or G P (right)."""
    return torch.matmul(proj.T, full) if side == "left" else torch.matmul(full, proj)


class ReferenceFlora:
    """FLoRA for one weight, straight from the paper: full-size factored second moment, compressed momentum with
    resampling and transfer M ← s·down_new(up_old(M)), s = √(r/(d+r+1)), every `kappa` steps, decoupled weight decay, fixed lr.

    `kind="adafactor"`: U = G/√V̂ (β2ₜ = 1 − t^decay), applied = β1·up(M) + (1−β1)·U, M updated with down(U), the
    applied update RMS-clipped. `kind="adamw"`: row/col EMAs with β2, m = β1·up(M) + (1−β1)·G, bias-corrected
    Adam step with eps outside the square root. `projection(k)` returns the k-th momentum projection (dim×r).
    """

    def __init__(self, weight, lr, side, projection, kind="adafactor", beta1=0.9, beta2=0.999, eps=1e-8, kappa=4,
                 weight_decay=0.0, clip_threshold=1.0, decay_rate=-0.8, eps1=1e-30):  # fmt: skip
        self.w, self.lr, self.side, self.projection, self.kind = weight, lr, side, projection, kind
        self.beta1, self.beta2, self.eps, self.kappa, self.wd = beta1, beta2, eps, kappa, weight_decay
        self.clip, self.decay, self.eps1 = clip_threshold, decay_rate, eps1
        m, n = weight.shape
        r = projection(0).shape[1]
        self.M = torch.zeros(r, n) if side == "left" else torch.zeros(m, r)
        self.row, self.col = torch.zeros(m), torch.zeros(n)
        self.t, self.k = 0, 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        g = grad.float()
        self.t += 1
        sq = g * g + self.eps1
        b2 = 1.0 - self.t**self.decay if self.kind == "adafactor" else self.beta2
        self.row = b2 * self.row + (1 - b2) * sq.mean(dim=1)
        self.col = b2 * self.col + (1 - b2) * sq.mean(dim=0)
        v_hat = torch.outer(self.row, self.col) / self.row.mean()
        fresh = g / torch.sqrt(v_hat) if self.kind == "adafactor" else g
        P = self.projection(self.k)
        applied = self.beta1 * reference_up(self.M, self.side, P) + (1 - self.beta1) * fresh
        if self.t % self.kappa == 0:
            self.k += 1
            P_new = self.projection(self.k)
            d, r = P.shape  # norm-preserving scale √(r/(d+r+1)) (docs/methods/flora.md, "Momentum transfer")
            self.M = math.sqrt(r / (d + r + 1)) * reference_down(reference_up(self.M, self.side, P), self.side, P_new)
            P = P_new
        self.M = self.beta1 * self.M + (1 - self.beta1) * reference_down(fresh, self.side, P)
        w = self.w
        if self.kind == "adafactor":
            applied_rms = math.sqrt(float((applied * applied).mean()))
            applied = applied / max(1.0, applied_rms / self.clip)
            w.copy_(w - self.lr * self.wd * w - self.lr * applied)
        else:
            bc1, bc2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
            denom = torch.sqrt(v_hat / bc2) + self.eps
            w.copy_(w * (1 - self.lr * self.wd) - (self.lr / bc1) * applied / denom)
