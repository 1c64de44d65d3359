"""Watching and steering α without synchronising: a device-side history and a restart rule.

Both work on any ``TLR`` (either backend) and never read a device value on the host
until the user asks for one (``AlphaHistory.read()``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alphas", "AlphaHistory", "AlphaRestart"]


def alphas(optimizer) -> list[Tensor]:
    """Every live α of ``optimizer``, as 0-dim device tensors (no copy, no host read).

    One per group with scope "group" (``group["alpha"]``); one per parameter with scope
    "tensor" (``state[p]["alpha"]``, or ``group["alpha"]``, the start value, before the
    parameter's first step).
    """
    out = []
    for group in optimizer.param_groups:
        if group.get("scope", "group") == "group":
            out.append(group["alpha"])
        else:
            out += [optimizer.state.get(p, {}).get("alpha", group["alpha"]) for p in group["params"]]
    return out


class AlphaHistory:
    """Record every α after each ``step()`` (or every ``every`` steps) into a device buffer.

    Recording is one ``torch.stack`` and one copy into a preallocated row per recorded
    step, on the optimizer's device: no host synchronisation. ``read()`` copies the
    rows written so far to the host (one synchronisation, when you ask) as a float32
    tensor [records, len(alphas(optimizer))].

    Example:
        >>> history = AlphaHistory(opt)           # registers a step post-hook
        >>> ...train...
        >>> history.read()[:, 0]                   # α of the first group over time
        >>> history.remove()
    """

    def __init__(self, optimizer, every: int = 1, chunk: int = 1024) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (expected an int >= 1)")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"Invalid chunk: {chunk!r} (expected an int >= 1)")
        self.optimizer, self.every, self.chunk = optimizer, every, chunk
        self._chunks: list[Tensor] = []
        self._rows = 0      # rows written (host counter: no device read needed)
        self._calls = 0
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.record())

    def record(self) -> None:
        """Append the current α's (called by the hook after every step)."""
        self._calls += 1
        if (self._calls - 1) % self.every:
            return
        current = torch.stack([a.detach().reshape(()).float() for a in alphas(self.optimizer)])
        if self._rows == len(self._chunks) * self.chunk:
            self._chunks.append(torch.empty(self.chunk, current.numel(), device=current.device))
        self._chunks[-1][self._rows % self.chunk].copy_(current)
        self._rows += 1

    def read(self) -> Tensor:
        """The α's recorded so far: a CPU float32 tensor [records, number of α's]."""
        if not self._chunks:
            return torch.empty(0, len(alphas(self.optimizer)))
        return torch.cat(self._chunks)[: self._rows].cpu()

    def remove(self) -> None:
        """Stop recording (the rows already written stay readable)."""
        self._handle.remove()


class AlphaRestart:
    """The paper's Appendix C idea as a recipe: when α falls below ``threshold``, restart it.

    Call ``step()`` where you would call a scheduler's (every epoch, or every N
    steps): each α below ``threshold`` becomes ``value`` (default: the α the group
    started from, ``group["initial_lr"]``). Done on the device with ``torch.where``: no host read. The
    optimizer's TLR state (window sums, momentum) is kept; only α changes.
    """

    def __init__(self, optimizer, threshold: float, value: float | None = None) -> None:
        for name, x in (("threshold", threshold), ("value", value)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0):
                raise ValueError(f"Invalid {name}: {x!r} (expected a finite number > 0)")
        self.optimizer, self.threshold, self.value = optimizer, float(threshold), value
        self._start = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        self.restarts = torch.zeros((), dtype=torch.int64)  # how many α's were restarted (on the device)

    def step(self) -> None:
        for group, start in zip(self.optimizer.param_groups, self._start):
            value = self.value if self.value is not None else start
            if group.get("scope", "group") == "group":
                targets = [group["alpha"]]
            else:
                targets = [self.optimizer.state[p]["alpha"] for p in group["params"] if "alpha" in self.optimizer.state.get(p, {})]
            for a in targets:
                low = a < self.threshold
                if self.restarts.device != a.device:
                    self.restarts = self.restarts.to(a.device)
                self.restarts += low
                a.copy_(torch.where(low, torch.full_like(a, value), a))
