"""Class counts, inverse-frequency weights and the human-readable class report (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence

from .sources import SPLITS, Sample


def class_counts(samples: Sequence[Sample], class_names: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(class_names, 0)
    for s in samples:
        counts[class_names[s.label]] += 1
    return counts


def inverse_frequency_weights(counts: dict[str, int]) -> list[float]:
    """``n / (k * n_c)`` per class (1.0 everywhere when balanced); 0 for a class with no samples.

    A weight of 0 keeps the loss finite; the DataModule refuses training sets that lack a class.
    """
    total = sum(counts.values())
    k = len(counts)
    return [total / (k * n) if n else 0.0 for n in counts.values()]


def count_table(samples: Sequence[Sample], class_names: Sequence[str]) -> str:
    """A small text table: classes as rows, splits (or 'all') as columns."""
    splits = [s for s in SPLITS if any(x.split == s for x in samples)]
    if any(x.split is None for x in samples):
        splits.append("unsplit")
    cols = splits or ["all"]
    table: dict[str, dict[str, int]] = {c: dict.fromkeys(cols, 0) for c in class_names}
    for x in samples:
        table[class_names[x.label]][x.split or ("unsplit" if splits else "all")] += 1
    width = max([len("class"), *map(len, class_names)])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{c:>7}" for c in cols) + f"  {'total':>7}"]
    for name in class_names:
        row = table[name]
        lines.append(
            f"{name:<{width}}  " + "  ".join(f"{row[c]:>7}" for c in cols) + f"  {sum(row.values()):>7}"
        )
    totals = [sum(table[n][c] for n in class_names) for c in cols]
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{t:>7}" for t in totals) + f"  {sum(totals):>7}")
    return "\n".join(lines)
