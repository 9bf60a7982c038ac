"""The PNNH layer on feature vectors (tokens): ``relu(mirror(linear(x)))`` over the last dimension.

The linear form of :class:`~pnnh.models.pnnh_cnn.PNNHConv2d` for Transformers' MLPs and other
token-wise layers: one linear map to ``C_l`` learner and ``C_c`` coder features, the coder mirrored,
then the ReLU::

    a = W x + b                                    # C_l + C_c features, W = [W_l; W_c]
    y = cat(relu(a_l), relu(a_c), relu(-a_c))      # C_l + 2 C_c = out_features

The coder rows start as ``+I`` on the input's ``relu(e)`` and ``-I`` on its ``relu(-e)``, so
``W_c x = e``: the code crosses the ReLU unchanged, layer after layer. No normalisation is
inside (a Transformer normalises before its MLP).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DiracWeight, _he_, init_dirac_param_
from .pnnh_cnn import CoderSpec

__all__ = ["PNNHLinear"]


class PNNHLinear(nn.Module):
    """``cat(relu(a_l), relu(a_c), relu(-a_c))`` with ``a = x W^T + b``, over the last dimension.

    Args:
        in_features, out_features: as ``nn.Linear``; ``out_features = C_l + 2 C_c``.
        n_code: coder features ``C_c`` [``spec.split(out_features)``].
        in_code: coder features of the input, laid out ``[learner | relu(e) | relu(-e)]``
            [``spec.split(in_features)``]; 0 for an input that carries no code.
        spec: coder options (:class:`~pnnh.models.pnnh_cnn.CoderSpec`): ``ratio``, ``init``
            (identity / orthogonal / he), ``mix``, ``learner_init``, ``path_param``
            (``"dirac"``: ``W = alpha P + beta V/|V|`` with the path ``P`` fixed, as in the conv layer).
        bias: learn a bias (zero at init).
    """

    def __init__(self, in_features: int, out_features: int, *, n_code: int | None = None, in_code: int | None = None,
                 spec: CoderSpec | None = None, bias: bool = True):
        super().__init__()
        spec = spec or CoderSpec()
        n_code, in_code = spec.code_layout(in_features, out_features, n_code, in_code, "features")
        self.in_features, self.out_features, self.n_code, self.in_code = in_features, out_features, n_code, in_code
        self.n_learn = out_features - 2 * n_code
        self.weight = nn.Parameter(torch.empty(self.n_learn + n_code, in_features))
        self.dirac = DiracWeight(torch.zeros_like(self.weight)) if spec.path_param == "dirac" else None
        self.bias = nn.Parameter(torch.zeros(self.n_learn + n_code)) if bias else None
        self.reset_parameters(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.linear_weight(), self.bias)
        x = torch.cat([x, -x[..., self.n_learn:]], dim=-1)
        x = F.relu(x)
        return x

    def linear_weight(self) -> torch.Tensor:
        """``[W_l; W_c]`` (through the DiracNet parametrisation when there is one)."""
        return self.weight if self.dirac is None else self.dirac(self.weight)

    @torch.no_grad()
    def reset_parameters(self, spec: CoderSpec) -> None:
        """He rows; the path ``P`` (learner identity with ``learner_init="dirac"``, coder ``+Q/-Q``
        on the input's code) replaces them where it has entries; ``spec.mix`` x He from the input's
        learner features into the coder rows. ``path_param="dirac"`` keeps ``P`` fixed beside ``V``."""
        fan_in = self.in_features
        n_in_learn = self.in_features - 2 * self.in_code
        path = torch.zeros_like(self.weight)
        m_l = min(self.n_learn, n_in_learn) if spec.learner_init == "dirac" and self.in_code > 0 else 0
        path[:m_l, :m_l] = torch.eye(m_l)
        m = min(self.n_code, self.in_code) if spec.init != "he" else 0
        if m > 0:
            q = torch.eye(m) if spec.init == "identity" else nn.init.orthogonal_(torch.empty(m, m))
            rows = slice(self.n_learn, self.n_learn + m)
            path[rows, n_in_learn:n_in_learn + m] = q
            path[rows, n_in_learn + self.in_code:n_in_learn + self.in_code + m] = -q
        _he_(self.weight, fan_in)
        if self.dirac is not None:
            self.dirac.path.copy_(path)
            init_dirac_param_(self.weight, spec.path_beta)
            nn.init.ones_(self.dirac.alpha)
            nn.init.constant_(self.dirac.beta, spec.path_beta)
        else:
            has_path = path.abs().sum(1) > 0
            self.weight[has_path] = path[has_path]
            if m > 0 and spec.mix > 0 and n_in_learn > 0:  # a short route from the learner features
                rows = slice(self.n_learn, self.n_learn + m)
                self.weight[rows, :n_in_learn] = torch.randn(m, n_in_learn) * spec.mix * math.sqrt(2.0 / fan_in)
        if self.bias is not None:
            self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features} (learner {self.n_learn}, coder 2x{self.n_code}), "
                f"in_code={self.in_code}")
