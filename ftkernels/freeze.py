"""Layer-level freezing by name pattern or module type, with a summary of what trains."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

Pattern = str | re.Pattern | type


@dataclass
class FreezeSummary:
    """What :func:`freeze` left trainable: totals and one row per top-level block."""

    trainable: int
    total: int
    blocks: list[tuple[str, int, int]] = field(default_factory=list)  # (name, trainable, total)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len("block")] + [len(b[0]) for b in self.blocks])
        lines = [f"{'block':<{width}}  {'trainable':>12}  {'total':>12}  {'%':>6}"]
        for name, t, n in self.blocks:
            lines.append(f"{name:<{width}}  {t:>12,}  {n:>12,}  {100 * t / max(n, 1):>5.1f}%")
        lines.append(f"{'all':<{width}}  {self.trainable:>12,}  {self.total:>12,}  {100 * self.fraction:>5.1f}%")
        return "\n".join(lines)


def _matcher(pattern: Pattern):
    """(name, module) -> bool. A string is a glob on the qualified name (``"encoder.layer.1?.*"``);
    a compiled regex is searched in it; a class matches modules of that type."""
    if isinstance(pattern, type):
        if not issubclass(pattern, nn.Module):
            raise TypeError(f"freeze: a type pattern must be an nn.Module subclass, got {pattern.__name__}")
        return lambda name, mod: isinstance(mod, pattern)
    if isinstance(pattern, re.Pattern):
        return lambda name, mod: pattern.search(name) is not None
    if isinstance(pattern, str):
        return lambda name, mod: fnmatch.fnmatchcase(name, pattern)
    raise TypeError(f"freeze: patterns are glob strings, compiled regexes or module types, got {pattern!r}")


def _params_matching(model: nn.Module, patterns, what: str) -> set[nn.Parameter]:
    """Params selected by any pattern: a match on a module selects all its params, a match on a
    param name selects that param. A pattern that selects nothing is an error."""
    if isinstance(patterns, (str, re.Pattern, type)):
        patterns = [patterns]
    chosen: set[nn.Parameter] = set()
    for pat in patterns:
        match = _matcher(pat)
        hits = set()
        for mname, mod in model.named_modules():
            if match(mname, mod):
                hits.update(mod.parameters())
        if not isinstance(pat, type):
            for pname, p in model.named_parameters():
                if match(pname, None):
                    hits.add(p)
        if not hits:
            shown = pat.__name__ if isinstance(pat, type) else getattr(pat, "pattern", pat)
            raise ValueError(f"freeze: {what} pattern {shown!r} matches no module or parameter of the model")
        chosen |= hits
    return chosen


def freeze(model: nn.Module, trainable=None, frozen=None, verbose: bool = True) -> FreezeSummary:
    """Freeze parameters by name pattern or module type; returns (and prints) a summary.

    - ``trainable=[...]``: everything is frozen except what these patterns select (feature
      extraction: ``trainable=["fc.*"]``; last blocks too: ``["layer4.*", "fc.*"]``).
    - ``frozen=[...]``: these are frozen (applied after ``trainable``); alone, the rest keeps its
      current ``requires_grad``.

    Patterns: glob strings on qualified module/parameter names, compiled regexes, or nn.Module
    subclasses (``nn.LayerNorm``). A module match covers all its parameters. Frozen parameters get
    ``requires_grad=False`` and their ``.grad`` dropped, so autograd allocates no gradient for them
    and computes no input gradient below the lowest trainable layer.
    """
    if trainable is None and frozen is None:
        raise ValueError("freeze: give trainable=[patterns], frozen=[patterns], or both")
    params = list(model.parameters())
    if trainable is not None:
        keep = _params_matching(model, trainable, "trainable")
        for p in params:
            p.requires_grad_(p in keep)
    if frozen is not None:
        for p in _params_matching(model, frozen, "frozen"):
            p.requires_grad_(False)
    for p in params:
        if not p.requires_grad:
            p.grad = None
    summary = summarize(model)
    if verbose:
        print(summary)
    return summary


def summarize(model: nn.Module) -> FreezeSummary:
    """Trainable vs total parameter counts, overall and per top-level child (shared params once)."""
    seen: set[int] = set()
    blocks = []
    for name, child in model.named_children():
        t = n = 0
        for p in child.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n += p.numel()
            t += p.numel() if p.requires_grad else 0
        blocks.append((name, t, n))
    own = [p for p in model.parameters(recurse=False) if id(p) not in seen]
    if own:
        seen.update(id(p) for p in own)
        blocks.append(("(own)", sum(p.numel() for p in own if p.requires_grad), sum(p.numel() for p in own)))
    return FreezeSummary(sum(b[1] for b in blocks), sum(b[2] for b in blocks), blocks)
