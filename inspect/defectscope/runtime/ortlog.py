"""Keep ONNX Runtime's start-up noise off the console and say in one line what happened.

What reaches the console while a session starts, and from where:

* the native logger writes to file descriptor 2: library-load failures at ERROR level
  ("Failed to load library libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: ..."),
  failed kernels ("Non-zero status code returned while running ...");
* ``onnxruntime.preload_dlls()`` prints to stdout ("Failed to load libcudnn...", a link to follow);
* onnxruntime < 1.23 ignores ``enable_fallback=0``: a failed session prints a four-line
  "EP Error" banner to stdout and retries on other providers;
* Python warnings from onnxruntime ("Specified provider ... is not in available provider names").

:func:`quiet_ort` sends all four to a buffer for the duration of a block;
:meth:`Captured.summary` condenses them to the first message that explains a failure.
Native output is caught by redirecting descriptors 1 and 2 (verified on Linux; on Windows a DLL
with its own C runtime may still write to the console).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: "2024-06-01 12:00:00.1 [E:onnxruntime:Default, provider_bridge_ort.cc:1862 TryGet...] message"
_NATIVE = re.compile(r"\[([VIWEF]):onnxruntime:[^\]]*\]\s*(.*)")
#: everything up to ORT's status code, e.g. "/onnxruntime_src/...cc:1539 Get() [ONNXRuntimeError] : 1 : FAIL : "
_ORT_STATUS = re.compile(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ")
_BANNER = re.compile(r"^\*+( EP Error \*+)?$")
#: ORT_THROW's location, e.g. "/onnxruntime_src/.../onnxruntime_pybind_state.cc:729 " (GCC) or "D:\\a\\x.cc:12 "
_SOURCE = re.compile(r"^\S+\.(?:cc|cpp|cu|h):\d+ ")
#: GCC's __PRETTY_FUNCTION__ after it, up to the argument list: a qualified name right before "("
_SIGNATURE = re.compile(r"(?:[\w:~<>,*&]+ ){0,6}?[\w:~<>*&]*::~?\w+(?:<[^()]*>)?\(")
#: the library the dynamic loader could not find, e.g. "libnvinfer.so.10: cannot open shared object file"
_MISSING_LIB = re.compile(r"(?<![\w.+-])(lib[\w+-]+\.so(?:\.\d+)*): cannot open shared object file")
#: "Failed to load library /site-packages/onnxruntime/capi/libX.so": the folder is noise in a one-line message
_LIBRARY_PATH = re.compile(r"(?<=library )\S*/(lib[^/\s]+)(?=[\s:,;)]|$)")
#: who ships the libraries a GPU provider loads, by name prefix (libcuda.so itself: see missing_library)
_LIBRARY_OWNERS = {
    "libnvinfer": "TensorRT",
    "libnvonnxparser": "TensorRT",
    "libcudnn": "cuDNN",
    "libcublas": "CUDA",
    "libcudart": "CUDA",
    "libcurand": "CUDA",
    "libcufft": "CUDA",
    "libnvrtc": "CUDA",
    "libnvJitLink": "CUDA",
    "libonnxruntime_": "onnxruntime-gpu",
}
#: Said by ORT < 1.24 for each session that fails to load while profiling is on, which the
#: runner turns on itself there (node placement from the start-up run): not news to the user.
_OWN_ECHO = ("Could not write a profile because no model was loaded",)


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line without ORT's source location, shortened: ORT messages can run to pages."""
    text = _own_words((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _own_words(text: str) -> str:
    """An ORT message without its source locations and library folders (exceptions and log lines alike)."""
    return _LIBRARY_PATH.sub(r"\1", _without_source(text))


def _without_source(text: str) -> str:
    """ORT's own words: drop its status prefix and "file.cc:123 signature(args) [with ...]" locations.

    Locations can be nested (a CUDA error quotes the call site after the thrower's); what is not
    recognisably a location is kept as it is.
    """
    text = _ORT_STATUS.sub("", text)
    for _ in range(4):
        found = _SOURCE.match(text)
        if found is None:
            return text
        rest = text[found.end() :]
        signature = _SIGNATURE.match(rest)
        if signature is not None:  # GCC: "ret ns::f(args) [const] [with T = ...] message"
            end = _closing(rest, signature.end() - 1, "()")
            if end is None:
                return text
            rest = re.sub(r"^(?:::<lambda\(\)>)?\s*(?:const\s+)?", "", rest[end:])
            if rest.startswith("[with "):
                end = _closing(rest, 0, "[]")
                rest = rest[end:].lstrip() if end is not None else rest
        else:  # MSVC: "ns::f message" (no argument list)
            token, _, tail = rest.partition(" ")
            if "::" not in token or "(" in token:
                return text
            rest = tail
        if not rest.strip():
            return text
        text = rest
    return text


def _closing(text: str, start: int, pair: str) -> int | None:
    """Index just past the bracket that closes ``text[start]``, or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == pair[0]:
            depth += 1
        elif text[i] == pair[1]:
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def missing_library(*texts: str) -> str | None:
    """'libnvinfer.so.10 not found (TensorRT ...)' when the loader could not find a library."""
    for text in texts:
        found = _MISSING_LIB.search(text)
        if found is None:
            continue
        lib = found.group(1)
        if re.fullmatch(r"libcuda\.so(\.\d+)*", lib):
            return f"{lib} not found (the NVIDIA driver is not installed or not loaded)"
        owner = next((o for prefix, o in _LIBRARY_OWNERS.items() if lib.startswith(prefix)), "its package")
        return f"{lib} not found ({owner} is not installed, or its lib folder is not on LD_LIBRARY_PATH)"
    return None


def failure_reason(reason: str, captured: Captured | None = None) -> str:
    """Why a provider did not start, in one line: a missing library first, then the error, then ORT's log.

    Only the exception and ORT's native error lines are searched for a missing library (not, say,
    an optional preload's chatter); once one is named, the log line that said it is left out.
    """
    errors = captured.native_errors() if captured else []
    missing = missing_library(reason, *errors)
    said = captured.summary(120) if captured else None
    log_named_it = bool(missing and errors and missing_library(errors[0]))  # the summary's first line
    if said and said[:60] not in reason and not log_named_it:
        reason = f"{reason.rstrip('.')}; onnxruntime: {said}"
    return f"{missing}; {reason}" if missing else reason


@dataclass
class Captured:
    """Everything written while :func:`quiet_ort` was active, one entry per line."""

    lines: list[str] = field(default_factory=list)

    def messages(self) -> list[str]:
        """Messages worth reporting, most telling first: native errors, then other lines.

        Native INFO/VERBOSE/WARNING lines are dropped (placement is reported by defectscope itself).
        """
        errors, other = self._split()
        return errors + other

    def native_errors(self) -> list[str]:
        """ORT's native ERROR/FATAL lines, without its source locations and library folders."""
        return self._split()[0]

    def _split(self) -> tuple[list[str], list[str]]:
        errors, other = [], []
        for raw in self.lines:
            line = _ANSI.sub("", raw).strip()
            if not line or _BANNER.match(line) or any(echo in line for echo in _OWN_ECHO):
                continue
            native = _NATIVE.search(line)
            if native is None:
                other.append(line)
            elif native.group(1) in "EF":
                errors.append(_own_words(native.group(2)))
        return errors, other

    def summary(self, limit: int = 160) -> str | None:
        """The first message, shortened, with a count of the rest; None when nothing was written."""
        found = self.messages()
        if not found:
            return None
        text = found[0] if len(found[0]) <= limit else found[0][: limit - 3] + "..."
        return text + (f" (+{len(found) - 1} more lines)" if len(found) > 1 else "")


@contextlib.contextmanager
def quiet_ort() -> Iterator[Captured]:
    """Capture stdout, stderr (Python and native) and warnings for the block."""
    captured = Captured()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    out, err = io.StringIO(), io.StringIO()
    with (
        tempfile.TemporaryFile() as sink,
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        warnings.simplefilter("always")
        saved = _point_fds_at(sink.fileno())
        try:
            yield captured
        finally:
            _restore_fds(saved)
            sink.seek(0)
            native = sink.read().decode("utf-8", "replace")
            for text in (native, out.getvalue(), err.getvalue()):
                captured.lines.extend(text.splitlines())
            captured.lines.extend(str(w.message) for w in caught if "onnxruntime" in w.filename)


def _point_fds_at(target: int) -> list[tuple[int, int]]:
    """Point descriptors 1 and 2 at ``target``; returns (fd, saved copy) pairs to restore."""
    saved = []
    for fd in (1, 2):
        try:
            copy = os.dup(fd)
        except OSError:  # no console (pythonw, some services): nothing to redirect
            continue
        os.dup2(target, fd)
        saved.append((fd, copy))
    return saved


def _restore_fds(saved: list[tuple[int, int]]) -> None:
    for fd, copy in saved:
        os.dup2(copy, fd)
        os.close(copy)
