"""One exported model, one ONNX Runtime session: load, validate, choose a provider, predict.

Everything a line PC needs comes from the ``.onnx`` file itself (graph + embedded
:class:`ModelMetadata`), so a run is reproducible from the model's sha256 alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .decision import Decision, decide
from .image import LoaderConfig, load_image_with_size, normalize_batch
from .metadata import METADATA_KEY, MetadataError, ModelMetadata
from .model_checks import ModelCheckError, check_model_file
from .providers import (
    GPU_PROVIDERS,
    PROVIDERS,
    ProviderError,
    candidates,
    import_ort,
    provider_chain,
    session_options,
)

__all__ = ["Decision", "Inspector", "MetadataError", "ModelLoadError", "ProviderError", "decide"]

INPUT_NAME = "input"
REQUIRED_OUTPUTS = ("logits", "probs")


class ModelLoadError(RuntimeError):
    """The model file cannot be used: missing, not ONNX, or not shaped like a defectscope export."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Inspector:
    """An ONNX Runtime session for one defectscope model.

    ``provider``: ``auto`` tries TensorRT, CUDA, then CPU among those this ORT build offers,
    moving on when a session cannot be created (one line on stderr says so); ``cpu``, ``cuda``
    or ``tensorrt`` force one and raise :class:`ProviderError` when it is unavailable.
    """

    @classmethod
    def from_args(cls, args: Any) -> Inspector:
        """The session the `inspect` and `watch` commands open from their shared options."""
        return cls(
            args.model,
            provider=args.provider,
            threads=args.threads,
            graph_opt=args.graph_opt,
            trt_cache_dir=args.trt_cache,
            max_batch=args.batch_size,
        )

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        provider: str = "auto",
        threads: int | None = None,
        graph_opt: str = "all",
        trt_cache_dir: str | os.PathLike[str] | None = None,
        *,
        max_batch: int = 32,
        io_binding: bool | None = None,
        available: Sequence[str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        ort = import_ort()

        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found")
        self.model_path = str(path)
        try:  # a model is data: nothing outside its folder, no custom operators (docs/trust.md)
            check_model_file(path)
        except ModelCheckError as exc:
            raise ModelLoadError(str(exc)) from None
        self.sha256 = file_sha256(path)
        ort.set_default_logger_severity(3)
        avail = list(available) if available is not None else list(ort.get_available_providers())
        kinds = candidates(provider, avail)
        self._options = session_options(threads, graph_opt)
        self.threads = int(self._options.intra_op_num_threads)

        hint = self._peek_metadata(ort) if any(k == "tensorrt" for k in kinds) else None
        failures: list[str] = []
        session = None
        for kind in kinds:
            try:
                session = self._create(ort, kind, hint, max_batch, trt_cache_dir)
                self.provider = kind
                break
            except Exception as exc:  # ORT raises several unrelated types for a failed provider
                if kind == "cpu":
                    raise ModelLoadError(
                        f"{path}: onnxruntime cannot load the model: {_first_line(exc)}"
                    ) from None
                if provider != "auto":
                    raise ProviderError(f"provider {kind!r} failed to start: {_first_line(exc)}") from None
                failures.append(f"{kind} failed ({_first_line(exc, 100)})")
        if session is None:  # every GPU candidate failed and CPU was not among them
            raise ProviderError("no execution provider could start: " + "; ".join(failures))
        if failures:
            self._log(f"defectscope: provider fallback: {'; '.join(failures)} -> using {self.provider}")
        self.session = session
        self.providers = list(session.get_providers())

        self.metadata = ModelMetadata.from_json(
            session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), source=self.model_path
        )
        self._check_graph()
        self._ng_indices = self.metadata.ng_indices
        if self.metadata.int8 and self.provider in GPU_PROVIDERS:
            self._log(
                f"defectscope: {path.name} is an int8 model made for the CPU provider, not {self.provider}; "
                "for GPU line PCs export fp32 or --fp16 instead"
            )
        self.has_cam = "cam" in self.output_names
        # IO binding: the batch is copied to the device once and outputs come back in one copy.
        # On by default for GPU providers; ``io_binding=True`` on the CPU exercises the same path.
        use_binding = self.provider in GPU_PROVIDERS if io_binding is None else io_binding
        self._io_device = ("cuda" if self.provider in GPU_PROVIDERS else "cpu") if use_binding else None

    # -- loading ---------------------------------------------------------------------------
    def _peek_metadata(self, ort: Any) -> ModelMetadata | None:
        """Read metadata with a throw-away CPU session: TensorRT options depend on it."""
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            s = ort.InferenceSession(self.model_path, so, providers=[PROVIDERS["cpu"]])
            return ModelMetadata.from_json(s.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
        except Exception:
            return None  # the real session reports the problem with full context

    def _create(
        self,
        ort: Any,
        kind: str,
        hint: ModelMetadata | None,
        max_batch: int,
        trt_cache_dir: str | os.PathLike[str] | None,
    ) -> Any:
        profile = None
        if kind == "tensorrt" and hint is not None and hint.loader.max_side:
            profile = (max_batch, hint.channels, hint.loader.min_size, hint.loader.max_side)
        chain = provider_chain(
            kind,
            trt_cache_dir=Path(trt_cache_dir) if trt_cache_dir else None,
            fp16=bool(hint and hint.fp16),
            profile=profile,
        )
        if kind == "tensorrt":
            Path(chain[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        if kind in GPU_PROVIDERS and hasattr(ort, "preload_dlls"):
            # CUDA/cuDNN from pip wheels (onnxruntime-gpu[cuda,cudnn]) must be preloaded
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(
                self.model_path, sess_options=self._options, providers=chain, enable_fallback=0
            )
        active = session.get_providers()
        if not active or active[0] != PROVIDERS[kind]:
            raise ProviderError(f"not activated, the session runs on {', '.join(active)}")
        return session

    def _check_graph(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or len(inputs[0].shape) != 4:
            got = ", ".join(f"{i.name}{i.shape}" for i in inputs)
            raise ModelLoadError(
                f"{self.model_path}: expected one input named {INPUT_NAME!r} shaped (N, C, H, W), got {got}"
            )
        ch = inputs[0].shape[1]
        if isinstance(ch, int) and ch != self.metadata.channels:
            raise ModelLoadError(
                f"{self.model_path}: graph input has {ch} channels but metadata says {self.metadata.channels}"
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [n for n in REQUIRED_OUTPUTS if n not in self.output_names]
        if missing:
            raise ModelLoadError(
                f"{self.model_path}: graph lacks output(s) {', '.join(missing)} "
                f"(has {', '.join(self.output_names)})"
            )

    # -- properties ------------------------------------------------------------------------
    @property
    def loader_config(self) -> LoaderConfig:
        return self.metadata.loader

    @property
    def threshold(self) -> float:
        return float(self.metadata.threshold)

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    # -- inference -------------------------------------------------------------------------
    def load(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode one image per the model's loader policy: (HWC uint8, original (w, h))."""
        return load_image_with_size(path, self.loader_config)

    def preprocess(self, images: Sequence[np.ndarray | str | os.PathLike[str]]) -> np.ndarray:
        """Equally sized images (HWC uint8 arrays or paths) -> normalised NCHW float32 batch."""
        arrays = [im if isinstance(im, np.ndarray) else self.load(im)[0] for im in images]
        return normalize_batch(arrays, self.metadata.mean, self.metadata.std)

    def predict(self, batch: np.ndarray, *, cam: bool = True) -> dict[str, np.ndarray]:
        """Run the model on an NCHW float32 batch; returns ``logits``, ``probs`` and ``cam`` if asked."""
        if batch.ndim != 4 or batch.shape[1] != self.metadata.channels:
            raise ValueError(
                f"expected a batch shaped (N, {self.metadata.channels}, H, W), got {tuple(batch.shape)}"
            )
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        names = [n for n in self.output_names if n in REQUIRED_OUTPUTS or (cam and n == "cam")]
        if self._io_device is not None:
            outs = self._run_bound(batch, names, self._io_device)
        else:
            outs = self.session.run(names, {INPUT_NAME: batch})
        return dict(zip(names, outs))

    def _run_bound(self, batch: np.ndarray, names: list[str], device: str) -> list[np.ndarray]:
        """GPU path: copy the input to the device once and let ORT allocate outputs there."""
        ort = import_ort()

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(batch, device, 0))
        for n in names:
            binding.bind_output(n, device, 0)
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> Decision:
        """The verdict for one image's probabilities under the model's NG classes."""
        chosen = self.threshold if threshold is None else threshold
        return decide(probs, self.metadata.class_names, self._ng_indices, chosen)
