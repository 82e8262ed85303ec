"""FusedAdagrad: torch.optim.Adagrad semantics plus fused regularizers."""

from __future__ import annotations

import torch

from ._fused import FusedOptimizer, group_defaults


class FusedAdagrad(FusedOptimizer):
    r"""Adagrad in one fused pass, with gradient mask/dropout, L1/L2/L2-SP/EWC, AMP and clipping.

    With ``g`` the gradient after the steps of :class:`FusedOptimizer` (``weight_decay`` coupled):

    .. math::
        s \leftarrow s + g^2;\quad p \leftarrow p - \frac{lr}{1 + (t-1)\,\text{lr\_decay}}
        \frac{g}{\sqrt{s} + \epsilon}

    State: ``sum`` (starts at ``initial_accumulator_value``) and ``step``.
    """

    kind = "adagrad"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
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
        return dict(maximize=False, initial_accumulator_value=0.0)

    def _check_kind(self, group, need) -> None:
        need(group["lr_decay"] >= 0, f"lr_decay must be >= 0, got {group['lr_decay']}")
        need(group["eps"] >= 0, f"eps must be >= 0, got {group['eps']}")
        need(
            group["initial_accumulator_value"] >= 0,
            f"initial_accumulator_value must be >= 0, got {group['initial_accumulator_value']}",
        )

    def _initial_state(self, key, group, p, dtype) -> torch.Tensor:
        return torch.full_like(p, group["initial_accumulator_value"], dtype=dtype, memory_format=torch.preserve_format)

    def _fill_hyper(self, h, group) -> None:
        h.lr_decay = float(group["lr_decay"])
        h.eps = float(group["eps"])
        h.weight_decay = float(group["weight_decay"])
        h.maximize = bool(group["maximize"])
