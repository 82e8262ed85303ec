"""Representation fine-tuning of a Hugging Face transformer: LoReFT interventions on the residual
stream of chosen layers at chosen token positions (``apply_reft``), the rest of the model frozen,
and save/load of the intervention weights.

Positions follow pyreft's notation: ``"f3+l3"`` = the first 3 and the last 3 real tokens of each
sequence (padding excluded, left or right, from the ``attention_mask`` the model is called with),
``"f1"``, ``"l2"``, or ``"all"``. Overlapping positions (a sequence shorter than f + l) are
intervened on once.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .nn import LoReFT

_POS = re.compile(r"^(?:([fl])(\d+))(?:\+([fl])(\d+))?$")


def parse_positions(positions: str) -> tuple[int, int] | None:
    """``"f3+l3"`` -> (3, 3), ``"l2"`` -> (0, 2), ``"all"`` -> None."""
    if positions == "all":
        return None
    m = _POS.match(positions.replace(" ", "")) if isinstance(positions, str) else None
    if m is None or (m.group(3) is not None and m.group(3) == m.group(1)):
        raise ValueError(f"apply_reft: positions must be 'all' or like 'f3+l3', 'f1', 'l2'; got {positions!r}")
    counts = {"f": 0, "l": 0}
    counts[m.group(1)] = int(m.group(2))
    if m.group(3):
        counts[m.group(3)] = int(m.group(4))
    if counts["f"] + counts["l"] == 0:
        raise ValueError(f"apply_reft: positions {positions!r} select no token")
    return counts["f"], counts["l"]


def position_index(valid: Tensor, first: int, last: int) -> tuple[Tensor, Tensor]:
    """Token indices ``[B, first + last]`` of the first ``first`` and last ``last`` valid tokens of each
    row of ``valid`` (``[B, T]`` bool, one contiguous run of valid tokens per row), and a keep flag
    per index: False for a slot past the sequence or one already covered by the first part (those
    slots point at a valid token and must be ignored). No host sync."""
    B, T = valid.shape
    n = valid.sum(1)  # [B]
    start = torch.argmax(valid.to(torch.int32), dim=1)  # first valid token (0 when none)
    j_f = torch.arange(first, device=valid.device)
    j_l = torch.arange(last, device=valid.device)
    pos_f = start[:, None] + j_f[None, :]
    keep_f = j_f[None, :] < n[:, None]
    pos_l = (start + n)[:, None] - last + j_l[None, :]
    keep_l = pos_l >= start[:, None] + first  # inside the sequence and not in the first part
    pos = torch.cat([pos_f, pos_l], dim=1)
    keep = torch.cat([keep_f, keep_l], dim=1)
    pos = torch.where(keep, pos, start[:, None].expand_as(pos)).clamp_(0, max(T - 1, 0))
    return pos, keep


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of layers: the ModuleList with ``config.num_hidden_layers`` entries (the
    longest one when the model has no config)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is not None:
        lists = [m for m in lists if len(m) == n] or lists
    if not lists:
        raise ValueError(f"apply_reft: found no list of layers in {type(model).__name__}")
    return max(lists, key=len)


class ReftModel(nn.Module):
    """The interventions applied to a model by :func:`apply_reft` (``interventions["<layer>"]`` are
    :class:`~ftkernels.nn.LoReFT`), with the hooks that run them. Train ``reft.parameters()``; call
    the model as usual (its train/eval mode also switches the interventions' dropout).
    ``save(path)`` / :func:`load_reft` store and restore the interventions; ``remove()`` takes the
    hooks off (the model is then the frozen original again)."""

    def __init__(self, model: nn.Module, layers: list[int], positions: str, r: int, dropout: float, d: int):
        super().__init__()
        self.config = {"layers": list(layers), "positions": positions, "r": r, "dropout": dropout, "d": d}
        self._span = parse_positions(positions)
        p = next(model.parameters())
        pdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        self.interventions = nn.ModuleDict(
            {str(i): LoReFT(d, r, dropout=dropout, device=p.device, dtype=pdtype) for i in layers}
        )
        self._valid: Tensor | None = None
        blocks = _blocks(model)
        self._handles = [
            model.register_forward_pre_hook(self._capture_mask, with_kwargs=True),
            model.register_forward_hook(self._release_mask),
        ]
        for i in layers:
            self._handles.append(blocks[i].register_forward_hook(self._hook(self.interventions[str(i)])))
        object.__setattr__(self, "model", model)  # not a submodule: its weights are not ours to save

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 2:
            mask = args[1]
        self._valid = mask.bool() if isinstance(mask, Tensor) else None

    def _release_mask(self, module, args, output):
        self._valid = None

    def _hook(self, intervention: LoReFT):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if not isinstance(h, Tensor) or h.dim() != 3:
                raise TypeError(f"apply_reft: layer {type(module).__name__} did not return hidden states [B, T, d]")
            if intervention.training != module.training:  # model.eval() turns the dropout off too
                intervention.train(module.training)
            new = self.intervene(intervention, h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def intervene(self, intervention: LoReFT, h: Tensor) -> Tensor:
        """h ``[B, T, d]`` with ``intervention`` applied at this model's positions (out of place)."""
        if self._span is None:
            return intervention(h)
        B, T, _ = h.shape
        valid = self._valid
        if valid is None or tuple(valid.shape) != (B, T):
            valid = torch.ones(B, T, dtype=torch.bool, device=h.device)
        pos, keep = position_index(valid.to(h.device), *self._span)
        rows = torch.arange(B, device=h.device)[:, None].expand_as(pos)
        hg = h[rows, pos]  # [B, P, d]
        delta = (intervention(hg) - hg) * keep[..., None].to(h.dtype)
        return torch.index_put(h, (rows, pos), delta, accumulate=True)  # ignored slots add zero

    def remove(self) -> None:
        """Take the hooks off the model."""
        for hd in self._handles:
            hd.remove()
        self._handles = []

    def save(self, path: str) -> None:
        """Write the interventions' weights and configuration to ``path`` (a ``torch.save`` file)."""
        blob = {"format": "ftkernels-reft-1", "config": self.config, "state_dict": self.interventions.state_dict()}
        torch.save(blob, path)

    def summary(self) -> dict:
        """Trainable (intervention) vs total (model) parameter counts."""
        mine = sum(p.numel() for p in self.parameters())
        return {"trainable": mine, "model": sum(p.numel() for p in self.model.parameters())}


def apply_reft(
    model: nn.Module, layers, positions: str = "f3+l3", r: int = 4, dropout: float = 0.0, d: int | None = None
) -> ReftModel:
    """Freeze ``model`` and put a LoReFT intervention on the output (residual stream) of each layer in
    ``layers`` (indices into the transformer's layer list, or ``"all"``), applied at ``positions``
    (``"f3+l3"``, ``"l1"``, ``"all"``; see the module doc). ``d`` defaults to ``config.hidden_size``.
    Returns the :class:`ReftModel` whose parameters are the only trainable ones."""
    blocks = _blocks(model)
    if layers == "all":
        layers = list(range(len(blocks)))
    layers = [int(i) for i in layers]
    if not layers or any(i < -len(blocks) or i >= len(blocks) for i in layers):
        raise ValueError(f"apply_reft: layers {layers} not within the model's {len(blocks)} layers")
    layers = sorted({i % len(blocks) for i in layers})
    if d is None:
        d = getattr(getattr(model, "config", None), "hidden_size", None)
        if d is None:
            raise ValueError("apply_reft: the model has no config.hidden_size; pass d")
    parse_positions(positions)
    model.requires_grad_(False)
    return ReftModel(model, layers, positions, r, dropout, d)


def load_reft(model: nn.Module, path: str) -> ReftModel:
    """Apply the interventions saved by :meth:`ReftModel.save` to ``model`` (same architecture)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "ftkernels-reft-1":
        raise ValueError(f"load_reft: {path} is not an ftkernels ReFT file")
    cfg = blob["config"]
    reft = apply_reft(model, cfg["layers"], cfg["positions"], cfg["r"], cfg["dropout"], cfg["d"])
    reft.interventions.load_state_dict(blob["state_dict"])
    return reft
