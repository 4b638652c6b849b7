"""A bounded summary of a results file: counts, a histogram and the top-K NG/error rows.

Built by streaming the JSONL once, so its size does not depend on the number of inputs and a
resumed run reports over all its rows, not just the last session's.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .results import iter_rows

DEFAULT_MAX_ITEMS = 200
HIST_BINS = 20


@dataclass
class Summary:
    max_items: int = DEFAULT_MAX_ITEMS
    total: int = 0
    ok: int = 0
    ng: int = 0
    error: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    hist_ok: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    hist_ng: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    providers: Counter[str] = field(default_factory=Counter)
    latency_sum_ms: float = 0.0
    _ng_heap: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.total += 1
        self.providers[str(row.get("provider"))] += 1
        self.latency_sum_ms += float(row.get("latency_ms") or 0.0)
        if row.get("status") != "ok":
            self.error += 1
            err = str(row.get("error") or "unknown")
            self.error_kinds[err.split(":", 1)[0]] += 1
            if len(self.errors) < self.max_items:
                self.errors.append({"path": row["path"], "error": err})
            return
        p = float(row["defect_prob"])
        b = min(HIST_BINS - 1, max(0, int(p * HIST_BINS)))
        self.labels[str(row.get("top_class"))] += 1
        if row.get("verdict") == "NG":
            self.ng += 1
            self.hist_ng[b] += 1
            keep = {
                k: row.get(k)
                for k in ("path", "top_class", "top_prob", "defect_prob", "probs", "width", "height")
            }
            entry = (p, -self.total, keep)  # ties: earlier rows win
            if len(self._ng_heap) < self.max_items:
                heapq.heappush(self._ng_heap, entry)
            elif self._ng_heap and entry[:2] > self._ng_heap[0][:2]:  # max_items 0 keeps none
                heapq.heapreplace(self._ng_heap, entry)
        else:
            self.ok += 1
            self.hist_ok[b] += 1

    @property
    def ng_items(self) -> list[dict[str, Any]]:
        """The kept NG rows, most confident defect first."""
        return [e[2] for e in sorted(self._ng_heap, key=lambda e: e[:2], reverse=True)]

    @property
    def mean_latency_ms(self) -> float:
        return self.latency_sum_ms / self.total if self.total else 0.0

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str], max_items: int = DEFAULT_MAX_ITEMS) -> Summary:
        s = cls(max_items=max_items)
        for row in iter_rows(path):
            s.add(row)
        return s
