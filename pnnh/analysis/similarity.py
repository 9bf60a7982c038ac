"""How much of the input a layer still carries: CKA, ridge reconstruction, and their noise floors.

Every measure here works from Gram matrices ``K = X Xᵀ`` (N×N for N images), so a layer's
activations are reduced to one N×N matrix inside the forward hook and never stored:

- **linear CKA** (Kornblith et al. 2019): ``<HKH, HLH> / (‖HKH‖ ‖HLH‖)`` with ``H`` the centring
  matrix and ``L`` the Gram of the input pixels. Biased upwards at finite N: unrelated
  high-dimensional features still score above 0.
- **debiased CKA**: the same with the unbiased HSIC estimator (Song et al. 2012), via the
  "unbiased centring" of Kornblith et al.'s reference code; about 0 for unrelated features.
- **ridge R²**: held-out R² of a kernel (dual) ridge regression from the layer's features to the
  downsampled input pixels. Two folds (each half of the images predicts the other), the ridge
  penalty chosen on the training fold by generalised cross-validation, R² pooled over pixels
  (``1 - SSE / SST`` with SST around the training mean) and averaged over the two folds.

**Noise floor.** Each measure is also computed with the pairing of activations and inputs
shuffled (image i's activations against image π(i)'s input, R random permutations), exactly as
the measured value otherwise (for ridge the penalty is re-selected per shuffle). A value is
*within the noise band* when it is at most ``mean + z·std`` of the shuffled values; the
**dissipation depth** is the first probe within the band.

All functions are batched over a leading "layers" dimension; no Python loop over samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["features_for_gram", "gram", "center_gram", "cka", "cka_with_floor", "ridge_r2_with_floor",
           "shuffles", "dissipation_depth", "noise_band"]


def features_for_gram(t: torch.Tensor, max_dim: int | None = 4096) -> torch.Tensor:
    """Flatten an activation to N×D, average-pooling spatially first if ``C·H·W > max_dim``.

    4-D activations are pooled with the smallest integer stride that brings ``C·H·W`` to at most
    ``max_dim`` (never below 1×1); 3-D (N×T×C token) activations are pooled along tokens.
    """
    t = t.detach()
    n = t.shape[0]
    if max_dim is not None and t[0].numel() > max_dim:
        if t.dim() == 4:
            c, h, w = t.shape[1:]
            k = math.ceil(math.sqrt(c * h * w / max_dim))
            t = F.adaptive_avg_pool2d(t, (max(1, math.ceil(h / k)), max(1, math.ceil(w / k))))
        elif t.dim() == 3:
            tok, c = t.shape[1:]
            k = math.ceil(tok * c / max_dim)
            t = F.adaptive_avg_pool1d(t.transpose(1, 2), max(1, math.ceil(tok / k))).transpose(1, 2)
    return t.reshape(n, -1).float()


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix of N×D features, centred over the batch first (exact, fewer cancellations)."""
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def center_gram(k: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """``HKH`` (biased) or the "unbiased centring" of Kornblith et al.'s debiased CKA; batched over leading dims.

    With unbiased centring, ``<K̃, L̃> / (n(n-3))`` is the unbiased HSIC estimator of Song et al.
    (2012) for kernels ``K`` and ``L``.
    """
    k = k.clone()
    n = k.shape[-1]
    if unbiased:
        k.diagonal(dim1=-2, dim2=-1).zero_()
        means = k.sum(-2) / (n - 2)
        means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
        k = k - means[..., :, None] - means[..., None, :]
        k.diagonal(dim1=-2, dim2=-1).zero_()
    else:
        means = k.mean(-2)
        means = means - means.mean(-1, keepdim=True) / 2
        k = k - means[..., :, None] - means[..., None, :]
    return k


def cka(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA between Gram matrices ``k`` (B×N×N or N×N) and ``l`` (N×N)."""
    kc = center_gram(k.double(), debiased)
    lc = center_gram(l.double(), debiased)
    num = (kc * lc).sum((-1, -2))
    return num / (kc.norm(dim=(-2, -1)) * lc.norm()).clamp_min(1e-300)


def shuffles(n: int, r: int, seed: int = 0) -> torch.Tensor:
    """``r`` random permutations of ``range(n)`` (r×n), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(r)]) if r else torch.empty(0, n, dtype=torch.long)


def cka_with_floor(grams: torch.Tensor, l: torch.Tensor, perms: torch.Tensor, debiased: bool = False,
                   chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """CKA of each of B Grams with ``l``, and with ``l`` under each shuffled pairing.

    Returns ``(values (B,), floor (B, R))`` in float64. Shuffling the pairing permutes the rows and
    columns of the input Gram; the centred Grams are permuted once and compared to every layer in
    one matmul. The layer Grams are centred in float32 (they come from batch-centred features, so
    the centring removes only rounding).
    """
    n = l.shape[0]
    lc = center_gram(l.double(), debiased)
    idx = torch.cat([torch.arange(n)[None], perms.cpu()], 0).to(l.device)  # S×N, identity first
    lp = (lc / lc.norm())[idx[:, :, None], idx[:, None, :]].reshape(idx.shape[0], -1).float()  # S×N²
    out = []
    for i in range(0, grams.shape[0], chunk):
        kc = center_gram(grams[i:i + chunk].float(), debiased).reshape(-1, n * n)
        out.append((kc @ lp.T).double() / kc.double().norm(dim=1, keepdim=True).clamp_min(1e-300))
    res = torch.cat(out, 0)
    return res[:, 0], res[:, 1:]


_LAMBDAS = torch.logspace(-6, 3, 19, dtype=torch.float64)  # relative to the mean kernel eigenvalue


def _ridge_fold(k: torch.Tensor, ys: torch.Tensor, tr: slice, te: slice, lambdas: torch.Tensor) -> torch.Tensor:
    """Held-out R² of kernel ridge for B Grams ``k`` and S target sets ``ys`` (S×N×P): returns B×S.

    The eigendecomposition is float64; the products with the targets are float32 (R² to ~1e-6).
    """
    ktr, kte = k[:, tr, tr].double(), k[:, te, tr].double()
    ntr = ktr.shape[-1]
    # centre the features on the training fold (an intercept), in kernel form
    m = ktr.mean(1)  # B×ntr
    mm = m.mean(1)[:, None, None]
    ktr = ktr - m[:, :, None] - m[:, None, :] + mm
    kte = kte - kte.mean(2, keepdim=True) - m[:, None, :] + mm
    s, u = torch.linalg.eigh(ktr)
    s = s.clamp_min(0)
    ytr, yte = ys[:, tr], ys[:, te]
    mu = ytr.mean(1, keepdim=True)
    ytr, yte = (ytr - mu).float(), (yte - mu).float()
    u32 = u.float()
    s_, p = ytr.shape[0], ytr.shape[2]
    # eigenbasis coordinates of the targets: B×ntr×(S·P)
    uy = u32.transpose(1, 2) @ ytr.permute(1, 0, 2).reshape(ntr, s_ * p)
    uy = uy.reshape(-1, ntr, s_, p)  # B×ntr×S×P
    lam = lambdas.to(s.device)[None, :] * s.mean(1, keepdim=True).clamp_min(1e-300)  # B×Λ
    shrink = lam[:, :, None] / (s[:, None, :] + lam[:, :, None])  # eigenvalues of I - H(λ): B×Λ×ntr
    rss = torch.einsum("blk,bks->bsl", shrink ** 2, (uy ** 2).sum(-1).double())  # B×S×Λ
    # GCV(λ) = n·RSS / tr(I - H)², n constant; the intercept (the centring's null direction,
    # shrink 1) is a fitted parameter, so it leaves the residual degrees of freedom
    dof = (shrink.sum(-1) - 1).clamp_min(1e-12)
    gcv = rss / dof[:, None, :] ** 2
    best = lam.gather(1, gcv.argmin(-1))  # B×S
    w = (1.0 / (s[:, :, None] + best[:, None, :])).float()  # B×ntr×S
    a = kte.float() @ u32  # B×nte×ntr
    pred = (a @ (w[..., None] * uy).reshape(-1, ntr, s_ * p)).reshape(-1, a.shape[1], s_, p)
    sse = ((yte.permute(1, 0, 2)[None] - pred) ** 2).sum((1, 3)).double()  # B×S
    sst = (yte ** 2).sum((-1, -2)).double().clamp_min(1e-300)  # S
    return 1 - sse / sst[None]


def ridge_r2_with_floor(grams: torch.Tensor, target: torch.Tensor, perms: torch.Tensor, chunk: int = 16,
                        lambdas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out ridge R² from each of B Grams to ``target`` (N×P), and under shuffled pairings.

    Two-fold: the first half of the images predicts the second and vice versa; the two R² are
    averaged (so the images should be in random order). ``lambdas``: candidate penalties relative to
    the mean eigenvalue of the training Gram (default 1e-6 … 1e3, 19 values), chosen per fold and
    target by GCV. Returns ``(values (B,), floor (B, R))``.
    """
    lambdas = _LAMBDAS if lambdas is None else torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    n = target.shape[0]
    y = target.double().reshape(n, -1)
    ys = torch.cat([y[None], y[perms.to(y.device)]], 0)  # S×N×P, unshuffled first
    h = n // 2
    halves = (slice(0, h), slice(h, n))
    out = []
    for i in range(0, grams.shape[0], chunk):
        k = grams[i:i + chunk]
        out.append((_ridge_fold(k, ys, halves[1], halves[0], lambdas)
                    + _ridge_fold(k, ys, halves[0], halves[1], lambdas)) / 2)
    res = torch.cat(out, 0)
    return res[:, 0], res[:, 1:]


def noise_band(floor: torch.Tensor, z: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, std, upper = mean + z·std)`` of shuffled-pairing values (B×R) per layer."""
    mean = floor.mean(1)
    std = floor.std(1) if floor.shape[1] > 1 else torch.zeros_like(mean)
    return mean, std, mean + z * std


def dissipation_depth(values: torch.Tensor, upper: torch.Tensor) -> int | None:
    """Index of the first probe whose value is within the noise band (``<= upper``), or ``None``."""
    hit = (values <= upper).nonzero()
    return int(hit[0]) if hit.numel() else None
