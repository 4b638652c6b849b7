"""How a provider that cannot start is told (issue 21): ONNX Runtime's own log lines for a missing GPU library
condensed to their cause, the library named first in the fall-back line, and the first line of a failure kept
in ONNX Runtime's own words. Split from test_runtime_gpu_start.py."""

from __future__ import annotations

import pytest

from defectscope.runtime.ortlog import Captured, failure_reason, first_line


def test_library_load_errors_are_condensed_to_their_cause() -> None:
    # the format ONNX Runtime's GPU builds log when TensorRT's libraries are missing (coloured on a tty)
    cap = Captured(
        [
            "\x1b[1;31m2025-01-07 10:00:00.1 [E:onnxruntime:Default, provider_bridge_ort.cc:1862 "
            "TryGetProviderInfo_TensorRT] /onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1539 "
            "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : "
            "Failed to load library libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: "
            "cannot open shared object file: No such file or directory",
            "\x1b[m",
            "2025-01-07 10:00:00.2 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:965 "
            "CreateExecutionProviderInstance] Failed to create TensorrtExecutionProvider.",
        ]
    )
    assert cap.summary(200) == (
        "Failed to load library libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: "
        "cannot open shared object file: No such file or directory"
    )
    assert Captured(["*************** EP Error ***************"]).summary() is None


# What onnxruntime-gpu 1.31.1 said on an NVIDIA H200 without TensorRT (2026-12-04, deploy/gpu_check.sh)
H200_TRT_ERROR = (
    "/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::python::"
    "RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::ProviderOptions&) Please install "
    "TensorRT libraries as mentioned in the GPU requirements page, make sure they're in the PATH or "
    "LD_LIBRARY_PATH, and that your GPU is supported."
)
H200_TRT_LOG = (
    "\x1b[1;31m2026-12-04 16:13:30.1 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 TryGetProviderInfo_TensorRT] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1844 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/tmp/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open "
    "shared object file: No such file or directory"
)


def test_a_missing_gpu_library_is_named_first_in_the_fallback_line() -> None:
    error = first_line(RuntimeError(H200_TRT_ERROR))
    assert error.startswith(
        "Please install TensorRT libraries"
    )  # ORT's source location and C++ signature dropped
    line = failure_reason(
        f"onnxruntime could not create the session: {error}", Captured([H200_TRT_LOG, "\x1b[m"])
    )
    assert line == (
        "libnvinfer.so.10 not found (TensorRT is not installed, or its lib folder is not on LD_LIBRARY_PATH); "
        f"onnxruntime could not create the session: {error}"
    )  # ORT's log line said the same and is left out
    native = "2026-12-04 16:13:30.1 [E:onnxruntime:Default, x.cc:1 f] Failed to load library {}: {}: cannot open shared object file"
    cudnn = Captured([native.format("/x/libonnxruntime_providers_cuda.so", "libcudnn.so.9")])
    assert failure_reason("not activated", cudnn).startswith(
        "libcudnn.so.9 not found (cuDNN is not installed"
    )
    driver = Captured([native.format("libonnxruntime_providers_cuda.so", "libcuda.so.1")])
    assert failure_reason("x", driver).startswith(
        "libcuda.so.1 not found (the NVIDIA driver is not installed"
    )
    # only ORT's native errors and the exception count: an optional preload's chatter names nothing
    chatter = Captured(["Failed to load libcublas.so.13: cannot open shared object file", "other"])
    assert failure_reason("not activated", chatter) == (
        "not activated; onnxruntime: Failed to load libcublas.so.13: cannot open shared object file (+1 more lines)"
    )
    assert failure_reason("/x/mylibbar.so.1: cannot open shared object file") == (
        "/x/mylibbar.so.1: cannot open shared object file"  # not "libbar.so.1"
    )


@pytest.mark.parametrize(
    "message, own_words",
    [
        ("/s/a.cc:729 void onnxruntime::f(A&, const B&) Please install (see docs).", "Please install (see docs)."),
        (  # MSVC's __FUNCTION__ has no argument list
            r"D:\a\cuda_call.cc:123 onnxruntime::CudaCall CUDA failure 35: x ; expr=cudaSetDevice(info_.device_id); ",
            "CUDA failure 35: x ; expr=cudaSetDevice(info_.device_id);",
        ),
        (  # GCC, nested: the thrower's location, then the call site's, each with a template [with ...]
            "/s/cuda_call.cc:121 std::conditional_t<T, void, S> onnxruntime::CudaCall(E, const char*) [with E = "
            "cudaError; bool T = true] /s/cuda_call.cc:114 std::conditional_t<T, void, S> onnxruntime::CudaCall(E, "
            "const char*) [with E = cudaError; bool T = true] CUDA failure 100: no CUDA-capable device is detected",
            "CUDA failure 100: no CUDA-capable device is detected",
        ),
        ("/s/a.cc:12 onnxruntime::Foo::Bar()::<lambda()> message here", "message here"),
        ("/s/a.cc:12 void onnxruntime::f(int) const trailing words", "trailing words"),
        ("/s/a.cc:12 void onnxruntime::f(int", "/s/a.cc:12 void onnxruntime::f(int"),  # never closes: kept
        ("/s/a.cc:12 void onnxruntime::f(int)", "/s/a.cc:12 void onnxruntime::f(int)"),  # nothing after: kept
        ("/s/a.cc:12 plain words (not a signature)", "/s/a.cc:12 plain words (not a signature)"),
        ("plain message (with parentheses)", "plain message (with parentheses)"),
        ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find Conv", "Could not find Conv"),
        ("Failed to load library /site/capi/libonnxruntime_providers_cuda.so with error: x",
         "Failed to load library libonnxruntime_providers_cuda.so with error: x"),
        ("Failed to load library /a/libdir/foo.so with error: x", "Failed to load library /a/libdir/foo.so with error: x"),
    ],
)  # fmt: skip
def test_first_line_keeps_onnxruntimes_own_words(message: str, own_words: str) -> None:
    assert first_line(RuntimeError(message), 400) == own_words
