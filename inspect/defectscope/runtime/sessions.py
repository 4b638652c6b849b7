"""Open the session a line PC runs on: choose the provider, start it, prove it, describe it.

The start-up policy in one place:

* which providers are tried: ``auto`` = TensorRT, CUDA, CPU among those this ORT build offers, but
  the CPU for an int8 model; a forced provider is the only one tried;
* what TensorRT gets: one explicit profile covering every size the model's loader produces, and an
  engine folder keyed by the model's sha256 (:mod:`.trt`);
* what "started" means: the requested provider is the session's first provider AND one run at each
  edge of the input range succeeds with finite outputs (:mod:`.startcheck`), so a failure falls
  back here rather than in the middle of a lot;
* what is said: one line per fallback, with ONNX Runtime's own output captured into it
  (:mod:`.ortlog`), and where the nodes run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import model_load_failure
from .metadata import INPUT_NAME, METADATA_KEY, MetadataError, ModelMetadata
from .ortlog import Captured, failure_reason, first_line, quiet_ort
from .providers import (
    GPU_PROVIDERS,
    INT8_ON_GPU,
    PROVIDERS,
    ProviderError,
    candidates,
    provider_chain,
    session_options,
)
from .startcheck import (
    OutputWidthError,
    Placement,
    exercise,
    placement_from_assignment,
    placement_from_profile,
)
from .trt import (
    TRT_MAX_BATCH,
    EngineCache,
    TrtProfile,
    clean_engine_cache,
    default_trt_cache,
    engine_folder,
    largest_side,
    profile_for,
    trt_options,
)

REQUIRED_OUTPUTS = ("logits", "probs")
Shape = tuple[int, int, int, int]


class ModelLoadError(RuntimeError):
    """The model file cannot be used: missing, not ONNX, or not shaped like a defectscope export."""


@dataclass(frozen=True)
class TrtRequest:
    """TensorRT settings from the command line (or a config), none of them tied to one command."""

    cache_dir: Path | None = None
    max_batch: int = TRT_MAX_BATCH
    max_side: int | None = None  # the profile's largest side for native-size models
    clean: bool = False  # remove other engines from the cache before starting


@dataclass
class Opened:
    """A started session and what the start-up found out about it."""

    session: Any
    kind: str
    metadata: ModelMetadata
    output_names: list[str]
    placement: Placement | None = None
    probe_diff: float | None = None
    profile: TrtProfile | None = None
    notes: list[str] = field(default_factory=list)
    gpu: int | None = None  # the device of a GPU provider, named so that one runner per GPU can be told apart

    @property
    def summary(self) -> str:
        """E.g. ``tensorrt (41 of 43 nodes; cuda 2), fp16 engine, start-up probe |Δp| <= 3.1e-04 vs CPU``."""
        text = self.placement.text if self.placement else self.kind
        if self.gpu is not None:
            text += f" on GPU {self.gpu}"
        if self.profile is not None and self.metadata.fp16:
            text += ", fp16 engine (TensorRT runs the whole graph in fp16, head included)"
        if self.probe_diff is not None:
            text += f", start-up probe |Δp| <= {self.probe_diff:.1e} vs CPU"
        return text


class _StartFailure(Exception):
    """One provider did not start; the message is the reason plus what ONNX Runtime said."""

    def __init__(self, reason: str, captured: Captured | None = None) -> None:
        super().__init__(failure_reason(reason, captured))


def read_metadata(session: Any, source: str) -> ModelMetadata:
    """The model's metadata, its loader config included, validated (MetadataError names the file)."""
    return ModelMetadata.from_json(
        session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), source=source
    )


def check_graph(session: Any, meta: ModelMetadata, source: str) -> list[str]:
    """The export's graph contract (one NCHW ``input``, ``logits`` and ``probs``); returns output names."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or len(inputs[0].shape) != 4:
        got = ", ".join(f"{i.name}{i.shape}" for i in inputs)
        raise ModelLoadError(
            f"{source}: expected one input named {INPUT_NAME!r} shaped (N, C, H, W), got {got}"
        )
    ch = inputs[0].shape[1]
    if isinstance(ch, int) and ch != meta.channels:
        raise ModelLoadError(f"{source}: graph input has {ch} channels but metadata says {meta.channels}")
    names = [o.name for o in session.get_outputs()]
    missing = [n for n in REQUIRED_OUTPUTS if n not in names]
    if missing:
        raise ModelLoadError(f"{source}: graph lacks output(s) {', '.join(missing)} (has {', '.join(names)})")
    shape = list(session.get_outputs()[names.index("probs")].shape)
    n = len(meta.class_names)
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != n):
        raise ModelLoadError(
            f"{source}: graph output probs is shaped {shape}, but the metadata names {n} classes: (N, {n}) expected"
        )
    return names


def start_shapes(kind: str, meta: ModelMetadata, profile: TrtProfile | None) -> list[Shape]:
    """The input shapes the start-up run uses: the smallest and the largest the runner will send."""
    if profile is not None:
        c, lo, hi = profile.channels, profile.min_side, profile.max_side
        return [(1, c, lo, lo), (profile.max_batch, c, hi, hi)]
    cfg = meta.loader
    lo, top = max(1, cfg.min_size), largest_side(cfg)
    return [(1, cfg.channels, lo, lo)] + ([(1, cfg.channels, top, top)] if top and top != lo else [])


class SessionOpener:
    """Tries the candidate providers in order and returns the first that starts and passes its check."""

    def __init__(
        self, ort: Any, model_path: str, sha256: str, threads: int | None, graph_opt: str, trt: TrtRequest,
        device_id: int = 0,
    ):  # fmt: skip
        self.ort, self.path, self.sha256 = ort, model_path, sha256
        self.threads, self.graph_opt, self.trt, self.device_id = threads, graph_opt, trt, device_id
        self.notes: list[str] = []

    def open(self, requested: str, available: list[str]) -> Opened:
        kinds = candidates(requested, available)
        meta = reference = None
        if any(k in GPU_PROVIDERS for k in kinds):
            reference, meta = self._reference()
            if meta.int8 and requested == "auto":
                kinds = candidates(requested, available, int8=True)
                self.notes.append(f"{Path(self.path).name} runs on the CPU provider: {INT8_ON_GPU}")
        failures: list[str] = []
        for kind in kinds:
            try:
                opened = self._start(kind, meta, reference)
            except _StartFailure as fail:
                if kind == "cpu":
                    raise ModelLoadError(model_load_failure(self.path, str(fail))) from None
                if requested != "auto":
                    raise ProviderError(f"provider {kind!r} failed to start: {fail}") from None
                failures.append(f"{kind} failed ({fail})")
                continue
            if failures:
                self.notes.insert(0, f"provider fallback: {'; '.join(failures)} -> using {kind}")
            opened.notes = self.notes + opened.notes
            return opened
        raise ProviderError("no execution provider could start: " + "; ".join(failures))

    def _reference(self) -> tuple[Any, ModelMetadata]:
        """A CPU session without graph optimisations: the metadata before any GPU session starts,
        and the shipped graph's numbers for the start-up comparison."""
        so = session_options(self.threads, "disable")
        session = error = None
        with quiet_ort():
            try:
                session = self.ort.InferenceSession(
                    self.path, so, providers=[PROVIDERS["cpu"]], enable_fallback=0
                )
            except Exception as exc:  # ORT raises unrelated types (InvalidProtobuf, Fail, ...)
                error = first_line(exc)
        if session is None:
            raise ModelLoadError(model_load_failure(self.path, f"onnxruntime cannot load the model: {error}"))
        return session, read_metadata(session, self.path)

    def _engine_cache(self, meta: ModelMetadata) -> tuple[TrtProfile, EngineCache]:
        cfg = meta.loader
        try:
            profile = profile_for(cfg, self.trt.max_batch, self.trt.max_side)
        except ProviderError as exc:
            raise _StartFailure(str(exc)) from None
        if self.trt.max_side is not None and cfg.max_side is not None:
            self.notes.append(
                f"--trt-max-side {self.trt.max_side} ignored: the model fixes max_side {cfg.max_side}"
            )
        root = self.trt.cache_dir or default_trt_cache()
        folder = engine_folder(root, self.sha256, profile, meta.fp16, self.ort.__version__)
        cache = EngineCache(folder)
        try:
            if self.trt.clean:
                n, freed = clean_engine_cache(root, keep=folder)
                self.notes.append(
                    f"TensorRT cache {root}: removed {n} old engine entries ({freed / 1e6:.1f} MB)"
                )
            cache.open()
        except OSError as exc:
            raise _StartFailure(f"TensorRT engine cache {root} is not usable: {exc}") from None
        return profile, cache

    def _start(self, kind: str, meta: ModelMetadata | None, reference: Any | None) -> Opened:
        profile = cache = options = None
        if kind == "tensorrt":
            assert meta is not None  # read by _reference whenever a GPU provider is a candidate
            profile, cache = self._engine_cache(meta)
            assert cache.workdir is not None
            options = trt_options(profile, cache.workdir, meta.fp16)
        # ORT < 1.24 cannot report node placement: profile the start-up run instead
        prof_dir = (
            None
            if hasattr(self.ort.InferenceSession, "get_provider_graph_assignment_info")
            else tempfile.mkdtemp()
        )
        try:
            opened, cap, failure = self._attempt(kind, meta, reference, profile, options, prof_dir)
        finally:
            if prof_dir:
                shutil.rmtree(prof_dir, ignore_errors=True)
        if failure is not None:
            if cache is not None:
                cache.discard()
            kind_of, message = failure
            if kind_of is not None:  # a model problem, not a provider problem
                raise kind_of(message)
            raise _StartFailure(message, cap)
        assert opened is not None
        if cache is not None and cache.workdir is not None:
            try:
                if cache.publish():
                    opened.notes.append(f"TensorRT engine for {profile} built and cached in {cache.folder}")
            except OSError as exc:  # the engine works; the next start builds it again
                opened.notes.append(f"TensorRT engine not cached in {cache.folder}: {exc}")
            weakref.finalize(opened.session, shutil.rmtree, str(cache.workdir), True)
        said = cap.summary(120)
        if said:
            opened.notes.append(f"onnxruntime said while starting {kind}: {said}")
        return opened

    def _attempt(
        self, kind: str, meta: ModelMetadata | None, reference: Any | None, profile: TrtProfile | None,
        options: dict[str, str] | None, prof_dir: str | None,
    ) -> tuple[Opened | None, Captured, tuple[type[Exception] | None, str] | None]:  # fmt: skip
        """Open, check and exercise one session with ORT's output captured.

        Failures come back as values, not exceptions, so that the failed session is destroyed
        inside the capture (ORT prints when it is) and nothing of it outlives this call.
        """
        prefix = os.path.join(prof_dir, "start") if prof_dir else None
        so = session_options(self.threads, self.graph_opt, profile_prefix=prefix)
        session = None
        with quiet_ort() as cap:
            try:
                session = self._session(kind, so, options)
                meta = meta or read_metadata(session, self.path)
                outputs = check_graph(session, meta, self.path)
                diff = exercise(
                    session,
                    start_shapes(kind, meta, profile),
                    reference if kind in GPU_PROVIDERS else None,
                    classes=len(meta.class_names),
                )
                placement = placement_from_assignment(session, kind)
                if prof_dir:
                    placement = placement_from_profile(session.end_profiling(), kind)
            except OutputWidthError as exc:
                session = None
                return None, cap, (ModelLoadError, f"{self.path}: {exc} (the metadata's class_names)")
            except Exception as exc:
                session = None
                own = type(exc) if isinstance(exc, MetadataError | ModelLoadError) else None
                return None, cap, (own, str(exc) if own else first_line(exc, 200))
        gpu = self.device_id if kind in GPU_PROVIDERS else None
        opened = Opened(session, kind, meta, outputs, placement, diff, profile, gpu=gpu)
        if placement is not None and placement.warning():
            opened.notes.append(str(placement.warning()))
        tol = meta.parity.get("prob_tolerance")
        if opened.probe_diff is not None and isinstance(tol, int | float) and opened.probe_diff > tol:
            opened.notes.append(
                f"{kind} differs from the CPU on the start-up probe by |Δp| {opened.probe_diff:.1e}, above the "
                f"export's parity tolerance {tol:g}; check verdicts with deploy/gpu_check.sh"
            )
        return opened, cap, None

    def _session(self, kind: str, so: Any, trt: dict[str, str] | None) -> Any:
        if kind in GPU_PROVIDERS and hasattr(self.ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # CUDA/cuDNN from pip wheels; prints what is missing
                self.ort.preload_dlls()
        try:
            session = self.ort.InferenceSession(
                self.path,
                sess_options=so,
                providers=provider_chain(kind, trt, self.device_id),
                enable_fallback=0,
            )
        except Exception as exc:  # ORT raises unrelated types (InvalidProtobuf, Fail, RuntimeError, ...)
            what = "cannot load the model" if kind == "cpu" else "could not create the session"
            raise _StartFailure(f"onnxruntime {what}: {first_line(exc)}") from None
        session.disable_fallback()  # ORT < 1.23 ignores enable_fallback=0 and would switch providers mid-lot
        active = session.get_providers()
        if not active or active[0] != PROVIDERS[kind]:
            raise ProviderError(f"not activated, the session runs on {', '.join(active)}")
        return session
