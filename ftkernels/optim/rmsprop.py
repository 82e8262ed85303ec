"""FusedRMSprop: torch.optim.RMSprop semantics (centered, momentum) plus fused regularizers."""

from __future__ import annotations

import torch

from ._fused import FusedOptimizer, group_defaults


class FusedRMSprop(FusedOptimizer):
    r"""RMSprop in one fused pass, with gradient mask/dropout, L1/L2/L2-SP/EWC, AMP and clipping.

    With ``g`` the gradient after the steps of :class:`FusedOptimizer` (``weight_decay`` coupled):

    .. math::
        v \leftarrow \alpha v + (1-\alpha) g^2;\quad
        \bar g \leftarrow \bar g + (1-\alpha)(g - \bar g) \text{ (centered)};\quad
        a = \sqrt{v - \bar g^2} + \epsilon \ \text{(centered) or } \sqrt{v} + \epsilon

    then ``b <- mu b + g / a; p <- p - lr b`` with momentum ``mu > 0``, else ``p <- p - lr g / a``.
    State: ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered), ``step``.
    """

    kind = "rmsprop"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        l1: float = 0.0,
        l2: float = 0.0,
        l2sp: float = 0.0,
        ewc: float = 0.0,
        grad_dropout: float = 0.0,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        anchors=None,
        fisher=None,
        anchor_dtype: torch.dtype | None = None,
    ):
        super().__init__(params, group_defaults(locals()), anchors=anchors, fisher=fisher, anchor_dtype=anchor_dtype)

    def _kind_defaults(self) -> dict:
        return dict(maximize=False, centered=False, momentum=0.0)

    def _check_kind(self, group, need) -> None:
        need(0 <= group["alpha"] <= 1, f"alpha must be in [0, 1], got {group['alpha']}")
        need(group["eps"] >= 0, f"eps must be >= 0, got {group['eps']}")
        need(group["momentum"] >= 0, f"momentum must be >= 0, got {group['momentum']}")

    def _state_keys(self, group) -> tuple:
        return (
            "square_avg",
            "momentum_buffer" if group["momentum"] > 0 else None,
            "grad_avg" if group["centered"] else None,
        )

    def _fill_hyper(self, h, group) -> None:
        h.alpha = float(group["alpha"])
        h.eps = float(group["eps"])
        h.weight_decay = float(group["weight_decay"])
        h.momentum = float(group["momentum"])
        h.centered = bool(group["centered"])
        h.maximize = bool(group["maximize"])
