"""One exported model, one ONNX Runtime session: load, validate, choose a provider, predict.

Everything a line PC needs comes from the ``.onnx`` file itself (graph + embedded
:class:`ModelMetadata`), so a run is reproducible from the model's sha256 alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .decision import Decision, decide
from .files import INSPECTED, ModelRole, file_sha256, model_file_problem, unusable_name
from .image import LoaderConfig, load_image_with_size, normalize_batch
from .metadata import MetadataError
from .model_checks import ModelCheckError, check_model_file
from .options import SessionConfig
from .providers import GPU_PROVIDERS, INT8_ON_GPU, NewSizeWatch, ProviderError, import_ort
from .sessions import INPUT_NAME, REQUIRED_OUTPUTS, ModelLoadError, SessionOpener, TrtRequest
from .trt import TRT_MAX_BATCH

__all__ = ["Decision", "Inspector", "MetadataError", "ModelLoadError", "ProviderError", "decide"]


def check_model_path(path: str | os.PathLike[str], role: ModelRole = INSPECTED) -> None:
    """The model argument names an existing file that may be a model (no checkpoint, image or empty
    file); cheap, so the commands check it first, before their inputs and outputs. ``role`` words the
    messages for what the command uses the model for."""
    unusable = unusable_name(path)
    if unusable:
        raise ModelLoadError(f"{path}: model file cannot be read ({unusable})")
    if Path(path).is_dir():
        raise ModelLoadError(f"{path} is a folder; expected the exported model file (.onnx)")
    if not Path(path).is_file():
        if Path(path).exists():
            raise ModelLoadError(f"{path}: is not a regular file (a pipe or device)")
        raise ModelLoadError(
            f"{path}: model file not found; expected an exported model (.onnx), written by defectscope export "
            f"CHECKPOINT {role.export_args}"
        )
    problem = model_file_problem(path, role)
    if problem:
        raise ModelLoadError(problem)
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:  # ONNX Runtime takes only UTF-8 paths (its message was a binding error)
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ModelLoadError(
            f"{shown}: the model's path is not UTF-8 text, which ONNX Runtime cannot open; rename the file "
            "or its folders"
        ) from None


class Inspector:
    """An ONNX Runtime session for one defectscope model.

    ``provider``: ``auto`` tries TensorRT, CUDA, then CPU among those this ORT build offers (the
    CPU alone for an int8 model), moving on when a session cannot start or fails its start-up run
    (one line on stderr says so); ``cpu``, ``cuda`` or ``tensorrt`` force one and raise
    :class:`ProviderError` when it is unavailable or fails.  ``trt_*``: see :class:`TrtRequest`.
    """

    @classmethod
    def from_config(cls, cfg: SessionConfig) -> Inspector:
        """The session the `inspect` and `watch` commands open from their shared options."""
        return cls(
            cfg.model,
            provider=cfg.provider,
            threads=cfg.threads,
            graph_opt=cfg.graph_opt,
            trt_cache_dir=cfg.trt_cache,
            trt_max_batch=cfg.trt_max_batch,
            trt_max_side=cfg.trt_max_side,
            trt_clean=cfg.trt_clean,
            device_id=cfg.device_id,
        )

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        provider: str = "auto",
        threads: int | None = None,
        graph_opt: str = "all",
        trt_cache_dir: str | os.PathLike[str] | None = None,
        *,
        trt_max_batch: int = TRT_MAX_BATCH,
        trt_max_side: int | None = None,
        trt_clean: bool = False,
        io_binding: bool | None = None,
        device_id: int = 0,
        available: Sequence[str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        ort = import_ort()

        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        path = Path(model_path)
        check_model_path(path)
        self.model_path = str(path)
        try:  # a model is data: nothing outside its folder, no custom operators (docs/trust.md)
            check_model_file(path)
        except ModelCheckError as exc:
            raise ModelLoadError(str(exc)) from None
        self.sha256 = file_sha256(path)
        ort.set_default_logger_severity(3)
        avail = list(available) if available is not None else list(ort.get_available_providers())
        trt = TrtRequest(
            Path(trt_cache_dir) if trt_cache_dir else None, trt_max_batch, trt_max_side, trt_clean
        )
        if not isinstance(device_id, int) or isinstance(device_id, bool) or device_id < 0:
            raise ProviderError(f"device_id must be a GPU index >= 0, got {device_id!r}")
        #: the GPU the CUDA and TensorRT providers (and IO binding) use; unused on the CPU
        self.device_id = device_id
        opener = SessionOpener(ort, self.model_path, self.sha256, threads, graph_opt, trt, device_id)
        opened = opener.open(provider, avail)
        for note in opened.notes:
            self._log(f"defectscope: {note}")
        self.session = opened.session
        self.provider = opened.kind
        self.providers = list(self.session.get_providers())
        self.threads = int(self.session.get_session_options().intra_op_num_threads)
        self.metadata = opened.metadata
        self.output_names = opened.output_names
        #: where the nodes run and what the start-up run measured, for logs and reports
        self.provider_summary = opened.summary
        self.trt_profile = opened.profile
        self._ng_indices = self.metadata.ng_indices
        self._grading = self.metadata.grader
        if self.metadata.int8 and self.provider in GPU_PROVIDERS:
            self._log(f"defectscope: {path.name} is int8 but runs on {self.provider}: {INT8_ON_GPU}")
        self._new_sizes = NewSizeWatch(self.provider, self._log)
        self.has_cam = "cam" in self.output_names
        # IO binding: the batch is copied to the device once and outputs come back in one copy.
        # On by default for GPU providers; ``io_binding=True`` on the CPU exercises the same path.
        use_binding = self.provider in GPU_PROVIDERS if io_binding is None else io_binding
        self._io_device = ("cuda" if self.provider in GPU_PROVIDERS else "cpu") if use_binding else None

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
        self._new_sizes.seen(batch.shape[2], batch.shape[3])
        names = [n for n in self.output_names if n in REQUIRED_OUTPUTS or (cam and n == "cam")]
        step = len(batch)
        if self.trt_profile is not None:  # the engine takes only shapes inside its profile
            if not self.trt_profile.covers(batch.shape):
                raise ValueError(
                    f"a {batch.shape[3]}x{batch.shape[2]} input is outside the TensorRT profile "
                    f"({self.trt_profile}); for a native-size model raise --trt-max-side"
                )
            step = self.trt_profile.max_batch
        if len(batch) <= step:
            return dict(zip(names, self._run(batch, names)))
        parts = [self._run(batch[i : i + step], names) for i in range(0, len(batch), step)]
        return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)}

    def _run(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if self._io_device is not None:
            return self._run_bound(batch, names, self._io_device)
        return list(self.session.run(names, {INPUT_NAME: batch}))

    def _run_bound(self, batch: np.ndarray, names: list[str], device: str) -> list[np.ndarray]:
        """GPU path: copy the input to the device once and let ORT allocate outputs there."""
        ort = import_ort()

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(
            INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(batch, device, self.device_id)
        )
        for n in names:
            binding.bind_output(n, device, self.device_id)
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> Decision:
        """The verdict for one image's probabilities under the model's NG classes."""
        chosen = self.threshold if threshold is None else threshold
        return decide(probs, self.metadata.class_names, self._ng_indices, chosen, self._grading)
