"""Augmentation pipelines from config, and the guard that keeps them size-preserving.

Pipelines act on HWC uint8 images *before* normalisation, so they see what the loader produced.
Bucket batches need every image to keep its preprocessed size, so a transform that changes it
(``RandomRotate90`` on a non-square image, a crop, a resize) is rejected at setup, before the
first step, instead of failing inside a worker in the middle of an epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from inspect import Parameter, signature
from typing import Any

import numpy as np

from ..hints import close_names
from ..plain import PlainDataError, check_plain
from .errors import DataConfigError

Transform = Callable[..., Any]


#: albumentations transforms a data config may name, by exact class name: a config read from a
#: checkpoint is built through this table only, never by importing the string it holds
ALLOWED_TRANSFORMS = (
    "Compose", "OneOf", "SomeOf", "Sequential", "NoOp",
    "HorizontalFlip", "VerticalFlip", "Transpose", "RandomRotate90", "D4", "Affine",
    "RandomBrightnessContrast", "RandomGamma", "CLAHE", "Equalize", "GaussNoise", "GaussianBlur",
    "MotionBlur", "MedianBlur", "Defocus", "Sharpen", "ImageCompression", "CoarseDropout",
)  # fmt: skip
#: the ones that hold other transforms under ``transforms``
CONTAINER_TRANSFORMS = ("Compose", "OneOf", "SomeOf", "Sequential")
TARGET_PREFIX = "albumentations."


def _allowed_name(node: Mapping[str, Any], where: str) -> str:
    target = node.get("_target_")
    name = (
        target[len(TARGET_PREFIX) :] if isinstance(target, str) and target.startswith(TARGET_PREFIX) else ""
    )
    for allowed in ALLOWED_TRANSFORMS:
        if name == allowed:
            return allowed
    raise PlainDataError(
        f"{where}._target_ is {target!r}; a data config is built only from the albumentations "
        f"transforms {', '.join(TARGET_PREFIX + n for n in ALLOWED_TRANSFORMS)}"
    )


def check_transform_spec(spec: Any, where: str) -> None:
    """Raise unless ``spec`` is None or an allow-listed transform with plain arguments (recursively)."""
    if spec is None:
        return
    if not isinstance(spec, Mapping):
        raise PlainDataError(
            f"{where}: expected a transform mapping with _target_, got {type(spec).__name__}"
        )
    name = _allowed_name(spec, where)
    args = {k: v for k, v in spec.items() if k != "_target_"}
    children = args.pop("transforms", None) if name in CONTAINER_TRANSFORMS else None
    check_plain(args, where)
    if name in CONTAINER_TRANSFORMS:
        if not isinstance(children, list) or not children:
            raise PlainDataError(f"{where}.transforms: {name} needs a non-empty list of transforms")
        for i, child in enumerate(children):
            check_transform_spec(child, f"{where}.transforms[{i}]")


def transform_from_spec(spec: Mapping[str, Any], where: str) -> Transform:
    """Build a checked spec (:func:`check_transform_spec`) from the allow-list; no Hydra, no imports by name."""
    import albumentations

    check_transform_spec(spec, where)
    name = _allowed_name(spec, where)
    args = {k: v for k, v in spec.items() if k != "_target_"}
    if name in CONTAINER_TRANSFORMS:
        args["transforms"] = [
            transform_from_spec(c, f"{where}.transforms[{i}]") for i, c in enumerate(args["transforms"])
        ]
    factory = getattr(albumentations, name)
    _check_argument_names(factory, args, f"{where}: albumentations.{name}")
    try:
        built: Transform = factory(**args)
    except Exception as exc:  # albumentations validates its arguments (pydantic)
        raise PlainDataError(f"{where}: albumentations.{name} refuses {_refusal(exc)}") from None
    return built


def _check_argument_names(factory: Callable[..., Any], args: Mapping[str, Any], what: str) -> None:
    """albumentations only warns of an unknown keyword and trains without it (a misspelt ``p`` leaves the default
    probability): refused here, with the names it takes."""
    params = signature(factory).parameters
    if any(p.kind is Parameter.VAR_KEYWORD for p in params.values()):
        return
    schema = getattr(
        getattr(factory, "InitSchema", None), "model_fields", {}
    )  # e.g. ``strict``, checked there
    names = [*params, *(f for f in schema if f not in params)]
    unknown = sorted(set(args) - set(names))
    if unknown:
        hints = [m for u in unknown for m in close_names(u, names, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise PlainDataError(f"{what} has no argument(s) {unknown}{hint}; it takes {', '.join(names)}")


def _refusal(exc: BaseException) -> str:
    """albumentations re-raises pydantic's many-line report as one ValueError; said here in one line: each
    argument, the value it got and what it should be."""
    report = getattr(exc.__cause__, "errors", None)
    if not callable(report):
        return "its arguments: " + " ".join(str(exc).split())
    problems: dict[str, tuple[Any, list[str]]] = {}
    for error in report():
        loc = error.get("loc") or ()
        arg = str(loc[0]) if loc else ""  # no argument: a rule across arguments (translate_px or _percent)
        why = str(error.get("msg", "")).removeprefix("Value error, ").removeprefix("Input ")
        problems.setdefault(arg, (error.get("input"), []))[1].append(why)
    return "; ".join(
        f"{arg}={value!r:.60}: {' or '.join(dict.fromkeys(whys))}"
        if arg
        else "its arguments: " + " or ".join(dict.fromkeys(whys))
        for arg, (value, whys) in problems.items()
    )


def build_transform(spec: Any, where: str = "data.transform") -> Transform | None:
    """``None``, a ready callable (e.g. an ``albumentations.Compose``), or an allow-listed spec."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        spec = transform_from_spec(spec, where)
    if not callable(spec):
        raise DataConfigError(
            f"{where}: expected a transform mapping with _target_, got {type(spec).__name__}"
        )
    return spec


def apply_transform(transform: Transform | None, image: np.ndarray) -> np.ndarray:
    """Run an albumentations-style transform on HWC uint8 and give HWC back (grey stays (H, W, 1))."""
    if transform is None:
        return image
    out = transform(image=image)["image"]
    out = np.asarray(out)
    if out.ndim == 2:
        out = out[:, :, None]
    return out


def seed_transform(transform: Transform | None, seed: int) -> None:
    """albumentations keeps its own RNG (not numpy's or torch's global one); seed it explicitly."""
    setter = getattr(transform, "set_random_seed", None)
    if callable(setter):
        setter(int(seed) % 2**32)


def _always(transform: Transform) -> Transform:
    """A copy of ``transform`` with every step that can run at probability 1 (and a choice among steps
    uniform), so the probe meets each step whatever its ``p`` (at p=0.1 a size-changing step hid from 8
    tries and failed mid-epoch); a step at p=0 stays off."""
    probe = copy.deepcopy(transform)
    todo: list[Any] = [probe]
    while todo:
        step = todo.pop()
        if isinstance(getattr(step, "p", None), float | int) and step.p > 0:  # p=0 never runs: left off
            step.p = 1.0
        children = list(getattr(step, "transforms", None) or [])
        if isinstance(getattr(step, "transforms_ps", None), list) and children:  # OneOf/SomeOf's weights
            live = [1.0 if getattr(c, "p", 1.0) > 0 else 0.0 for c in children]
            step.transforms_ps = [w / max(sum(live), 1.0) for w in live]
        todo.extend(children)
    return probe


def check_size_preserving(
    transform: Transform | None, sizes: Iterable[tuple[int, int]], channels: int, name: str, tries: int = 16
) -> None:
    """Raise if ``transform`` changes the (H, W, C) shape of images of the given (h, w) sizes.

    Probes one square and one non-square size (if present) ``tries`` times each, every step applied
    (:func:`_always`) with a private seed; a step's own random choice (a 90 or 180 degree turn) is still
    drawn, so 16 tries miss an odd turn with probability 2**-16.
    """
    if transform is None:
        return
    distinct = sorted(set(sizes))
    probes = [s for s in distinct if s[0] == s[1]][:1] + [s for s in distinct if s[0] != s[1]][:1]
    probe = _always(transform)
    seed_transform(probe, 12345)
    rng = np.random.default_rng(0)
    for h, w in probes:
        img = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        for _ in range(tries):
            out = apply_transform(probe, img)
            if out.shape != img.shape or out.dtype != np.uint8:
                raise DataConfigError(
                    f"data.{name} changed an image of shape {img.shape} (uint8) into {out.shape} ({out.dtype}); "
                    "bucket batches need transforms that keep size and dtype (RandomRotate90/Transpose only "
                    "for square images: data.dihedral=true rotates any size; no crops or resizes, no "
                    "normalisation — that comes after)"
                )
