"""FusedSGD: torch.optim.SGD semantics (momentum, dampening, Nesterov) plus fused regularizers."""

from __future__ import annotations

import torch

from ._fused import FusedOptimizer, group_defaults


class FusedSGD(FusedOptimizer):
    r"""SGD in one fused pass, with gradient mask/dropout, L1/L2/L2-SP/EWC, AMP and clipping.

    With ``g`` the gradient after the steps of :class:`FusedOptimizer` (``weight_decay`` is coupled,
    added to ``g`` as ``wd * p``, as in torch.optim.SGD):

    .. math::
        b \leftarrow \mu b + (1-\tau) g \ (b = g \text{ on the first step});\quad
        d = g + \mu b \text{ (Nesterov) or } b;\quad p \leftarrow p - lr\, d

    (``d = g`` when ``momentum = 0``). State: ``momentum_buffer`` and ``step``.
    """

    kind = "sgd"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        return dict(nesterov=False, maximize=False, dampening=0.0)

    def _check_kind(self, group, need) -> None:
        need(group["momentum"] >= 0, f"momentum must be >= 0, got {group['momentum']}")
        need(
            not group["nesterov"] or (group["momentum"] > 0 and group["dampening"] == 0),
            "Nesterov momentum requires a momentum and zero dampening",
        )

    def _state_keys(self, group) -> tuple:
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None)

    def _fill_hyper(self, h, group) -> None:
        h.momentum = float(group["momentum"])
        h.dampening = float(group["dampening"])
        h.weight_decay = float(group["weight_decay"])
        h.nesterov = bool(group["nesterov"])
        h.maximize = bool(group["maximize"])
