"""Sharpness-aware minimisation (SAM, Foret et al. 2021) around any optimizer (``optim.sam_rho``).

Each step takes the gradient twice: once at the weights, then at the weights moved ``rho`` (in L2
norm) uphill along that gradient, and the wrapped optimizer steps from the original weights with the
second gradient. A flat minimum generalises better on small sets; the price is two forward/backward
passes per step. The wrapper owns no optimizer state: its ``state_dict`` is the wrapped optimizer's,
so checkpoints and resumes are those of the plain optimizer. Mixed precision with a gradient scaler
(``trainer.precision`` 16) steps without the closure, so it is refused with SAM before training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._BatchNorm,)


class SharpnessAware(torch.optim.Optimizer):
    """SAM around ``base``; Lightning's automatic optimization hands :meth:`step` the closure it needs."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, model: nn.Module) -> None:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        super().__init__(base.param_groups, base.defaults)
        self.base = base
        self._share()
        self.rho = float(rho)
        self._model = model
        #: True while the closure runs at the perturbed weights (the module logs nothing then)
        self.perturbed = False

    def _share(self) -> None:
        """One list of groups and one state: schedulers set the LRs the base steps with, and Lightning
        moves the base's state between devices. Loading a state replaces the base's groups, so again then."""
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def _grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def _climb(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Move each weight ``rho * g / ||g||`` uphill; returns the moves to undo."""
        pairs = self._grads()
        if not pairs:
            return []
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in pairs]))
        scale = self.rho / (norm + 1e-12)  # a tensor: no device sync
        moves = []
        for p, g in pairs:
            move = g * scale
            p.add_(move)
            moves.append((p, move))
        return moves

    @contextmanager
    def _at_perturbed_weights(self) -> Iterator[None]:
        """BatchNorm statistics stay those of the real weights: momentum 0 during the second pass."""
        norms = [m for m in self._model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
        saved = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0
        self.perturbed = True
        try:
            yield
        finally:
            self.perturbed = False
            for m, momentum in zip(norms, saved, strict=True):
                m.momentum = momentum

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise RuntimeError("sharpness-aware minimisation needs the loss closure (automatic optimization)")
        with torch.enable_grad():
            loss = closure()  # gradient clipping and AGC (on_before_optimizer_step) follow each pass
        moves = self._climb()
        try:
            with self._at_perturbed_weights(), torch.enable_grad():
                closure()
        finally:
            with torch.no_grad():
                for p, move in moves:
                    p.sub_(move)
        self.base.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self._share()
