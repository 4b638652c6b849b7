"""Class counts, inverse-frequency weights and the human-readable class report (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence

from .records import SPLITS, Sample


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


#: fewer validation/test images of a class than this and its figures move in steps of >= 20 pp
MIN_EVAL_IMAGES = 5


def split_warnings(samples: Sequence[Sample], class_names: Sequence[str], good_class: str) -> list[str]:
    """What the split cannot measure: classes missing from (or rare in) validation or test.

    Validation chooses the OK/NG threshold for ``threshold.target_recall``; without defect images
    there it stays at ``threshold.default``.  An empty split (``test_fraction: 0``) is a choice,
    not a warning.
    """
    out: list[str] = []
    counts = {
        split: class_counts([s for s in samples if s.split == split], class_names)
        for split in ("val", "test")
    }
    for split, per_class in counts.items():
        if not any(per_class.values()):
            continue
        what = "recall (and the threshold's view of it)" if split == "val" else "test figures"
        for name, n in per_class.items():
            if n == 0:
                out.append(f"class {name!r} has no {split} images: its {what} cannot be measured")
            elif n < MIN_EVAL_IMAGES:
                out.append(
                    f"class {name!r} has only {n} {split} image(s): each one moves its {what} by {100 / n:.0f} pp"
                )
    if any(counts["val"].values()) and not any(n for c, n in counts["val"].items() if c != good_class):
        out.append(
            "the validation split has no defect images: the OK/NG threshold cannot be chosen for "
            "threshold.target_recall and stays at threshold.default"
        )
    if out:
        out.append(
            "what to do: add images of these classes, raise data.split.val_fraction / data.split.test_fraction, "
            "or give fixed splits (<root>/train|val|test/<class>/)"
        )
    return out
