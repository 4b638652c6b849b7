"""How a network's raw outputs become class probabilities: softmax, or CORN for ordered grades.

CORN (conditional ordinal regression, Shi et al. 2023) gives a K-grade model K - 1 outputs, one per
step between neighbouring grades: output k is the logit of P(grade > k | grade > k - 1).  The chain
rule gives P(grade > k) as a product, which is monotone by construction, and the class probabilities
``p_k = P(grade > k - 1) * (1 - sigmoid(l_k))`` (the last grade takes what is left) sum to one
exactly.

:class:`CornModel` wraps such a network so that it keeps the model contract every consumer relies
on: ``forward`` gives K values whose softmax is the class probabilities (they are the log
probabilities), and ``cam`` gives K maps.  The map of grade k >= 1 is the evidence for "grade >= k"
(the map of output k - 1), that of grade 0 the evidence against "grade >= 1"; each map's spatial mean
is its output logit without the bias, as for a softmax head.  The link is chosen by name from
:data:`LINKS`; a name read from a checkpoint selects among these two and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelConfigError

LINKS = ("softmax", "corn")
_COPIED = ("in_chans", "num_features", "min_input_size", "min_feature_size", "total_stride", "model_name")


def check_link(link: str) -> str:
    if link not in LINKS:
        raise ModelConfigError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
    return link


def raw_outputs(num_classes: int, link: str) -> int:
    """Outputs the network needs for ``num_classes`` classes under ``link``."""
    return num_classes - 1 if check_link(link) == "corn" else num_classes


def corn_log_probs(raw: torch.Tensor) -> torch.Tensor:
    """(N, K-1) CORN logits -> (N, K) log class probabilities (stable: log-sigmoids only)."""
    log_above = torch.cumsum(F.logsigmoid(raw), dim=1)  # log P(grade > k), k = 0 .. K-2
    before = torch.cat([torch.zeros_like(log_above[:, :1]), log_above[:, :-1]], dim=1)
    return torch.cat([before + F.logsigmoid(-raw), log_above[:, -1:]], dim=1)


class CornModel(nn.Module):
    """A K-1-output network seen as a K-class model: log-probability "logits" and K heat maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for name in _COPIED:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        outputs: Any = model.num_classes
        self.num_classes = int(outputs) + 1

    @property
    def head(self) -> Any:
        """The wrapped network's final nn.Linear (K - 1 outputs)."""
        return self.model.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        return m.forward_features(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        return corn_log_probs(m.forward_head(f).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam_from_features(self, f: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        maps = m.cam_from_features(f)
        return torch.cat([-maps[:, :1], maps], dim=1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_from_features(self.forward_features(x))


def with_link(model: nn.Module, link: str) -> nn.Module:
    """``model`` as a K-class model: itself for softmax, wrapped in :class:`CornModel` for CORN."""
    return CornModel(model) if check_link(link) == "corn" else model
