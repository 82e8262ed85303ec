"""FusedAdamW: torch.optim.AdamW semantics plus the fused regularizers of FusedOptimizer."""

from __future__ import annotations

import torch

from ._fused import FusedOptimizer, group_defaults


class FusedAdamW(FusedOptimizer):
    r"""AdamW in one fused pass, with gradient mask/dropout, L1/L2/L2-SP/EWC, AMP and clipping.

    For each element, with ``g`` the gradient after the steps of :class:`FusedOptimizer`:

    .. math::
        p \leftarrow p (1 - lr\,wd);\quad m \leftarrow \beta_1 m + (1-\beta_1) g;\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2;\quad
        p \leftarrow p - \frac{lr}{1-\beta_1^t}\,\frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    with ``\hat v = max`` over steps of ``v`` when ``amsgrad``. With every extra option off this is
    ``torch.optim.AdamW`` step for step, and the state dicts load into each other.

    Args:
      params: iterable of params or param groups (named params accepted, names appear in errors).
      lr: float or 0-dim tensor (schedulers keep working; a tensor lr is read on the device).
      betas, eps, weight_decay (decoupled), amsgrad, maximize: as ``torch.optim.AdamW``.
      l1, l2, l2sp, ewc, grad_dropout, max_grad_norm, master_weights: see
        :class:`~ftkernels.optim._fused.FusedOptimizer`; ``master_weights=True`` keeps an fp32 copy
        of fp16/bf16 params and fp32 moments.
      anchors, fisher, anchor_dtype: L2-SP/EWC inputs (see FusedOptimizer).
      foreach, fused, capturable: accepted as ``torch.optim`` takes them, and ignored (the step is
        always one fused multi-tensor pass without host syncs); ``differentiable=True`` raises.
    """

    kind = "adamw"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
        betas = tuple(betas)
        super().__init__(params, group_defaults(locals()), anchors=anchors, fisher=fisher, anchor_dtype=anchor_dtype)

    def _kind_defaults(self) -> dict:
        return dict(amsgrad=False, maximize=False)

    def _check_kind(self, group, need) -> None:
        b1, b2 = group["betas"]
        need(0 <= b1 < 1 and 0 <= b2 < 1, f"betas must be in [0, 1), got {group['betas']}")
        need(group["eps"] >= 0, f"eps must be >= 0, got {group['eps']}")

    def _state_keys(self, group) -> tuple:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _fill_hyper(self, h, group) -> None:
        h.beta1, h.beta2 = (float(b) for b in group["betas"])
        h.eps = float(group["eps"])
        h.weight_decay = float(group["weight_decay"])
        h.amsgrad = bool(group["amsgrad"])
        h.maximize = bool(group["maximize"])
