"""Where latency is measured: ONNX Runtime or torch, on the CPU or a CUDA GPU.

A backend turns a decoder's weights and a workload into a ready-to-call forward pass with its
inputs bound, and times it: warm-up calls, then repeats, reporting the median and the spread.
Threads are pinned per backend and recorded in its fingerprint, which a latency table carries
so that a table is never silently used on another machine or software stack.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import torch

from latency_models.graph import Decoder, DecoderWeights, example_inputs
from latency_models.workload import Workload
from searcher.errors import SearcherError


@dataclass(frozen=True)
class Timing:
    """``warmup`` calls of each graph, then rounds (one call of each graph per round) until at
    least ``repeats`` rounds and ``min_seconds`` times the number of graphs have passed, and
    at most ``max_repeats`` rounds."""

    warmup: int = 2
    repeats: int = 5
    min_seconds: float = 0.3
    max_repeats: int = 200


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Measurement:
        xs = list(samples)
        q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
        return cls(statistics.median(xs), q[0], q[-1], len(xs), tuple(xs))

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80% of the repeats."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def ratio(self, other: Measurement) -> float:
        """Median of the round-by-round ratios to a graph timed interleaved with this one: on
        a machine whose speed drifts (shared VMs), far steadier than a ratio of medians."""
        return statistics.median(a / b for a, b in zip(self.samples, other.samples, strict=True))


def time_interleaved(
    calls: Sequence[Callable[[], Any]], timing: Timing, sync: Callable[[], None] = lambda: None
) -> list[Measurement]:
    """Time several graphs round-robin, one call of each per round, so that a change in the
    machine's speed (other tenants, frequency) hits all of them alike."""
    for call in calls:
        for _ in range(timing.warmup):
            call()
    sync()
    samples: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    rounds = 0
    while rounds < timing.max_repeats and (
        rounds < timing.repeats or time.perf_counter() - start < timing.min_seconds * len(calls)
    ):
        for call, out in zip(calls, samples):
            t0 = time.perf_counter()
            call()
            sync()
            out.append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    return [Measurement.of(xs) for xs in samples]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


class Backend(ABC):
    """One runtime on one device, with its threads pinned."""

    name: ClassVar[str]
    gpu: ClassVar[bool] = False

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or len(os.sched_getaffinity(0)) or 1  # the cores we may use
        self._check()

    @abstractmethod
    def _check(self) -> None:
        """Raise a SearcherError when this backend cannot run here."""

    @abstractmethod
    def prepare(self, weights: DecoderWeights, workload: Workload) -> Callable[[], Any]:
        """A call that runs one forward pass of the workload, inputs already in place."""

    def _sync(self) -> None:
        return None

    def time(self, calls: Sequence[Callable[[], Any]], timing: Timing) -> list[Measurement]:
        """Time prepared calls, interleaved."""
        return time_interleaved(calls, timing, self._sync)

    def measure_many(
        self, weights: Sequence[DecoderWeights], workload: Workload, timing: Timing
    ) -> list[Measurement]:
        return self.time([self.prepare(w, workload) for w in weights], timing)

    def fingerprint(self) -> dict[str, Any]:
        """What the latency of a graph on this backend depends on, besides the graph."""
        out: dict[str, Any] = {
            "backend": self.name,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": self.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        if self.gpu:
            out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
            out["cuda"] = torch.version.cuda
        return out


class TorchBackend(Backend):
    name = "torch-cpu"
    device = "cpu"

    def _check(self) -> None:
        if self.gpu and not torch.cuda.is_available():
            raise SearcherError(
                f"--device {self.name}: no CUDA GPU is visible to torch here; use torch-cpu "
                "or ort-cpu, or run on a machine with a GPU"
            )

    def time(self, calls: Sequence[Callable[[], Any]], timing: Timing) -> list[Measurement]:
        before = torch.get_num_threads()  # the caller's own threads (e.g. for scoring)
        torch.set_num_threads(self.threads)
        try:
            return super().time(calls, timing)
        finally:
            torch.set_num_threads(before)

    def prepare(self, weights: DecoderWeights, workload: Workload) -> Callable[[], Any]:
        decoder = Decoder(weights, workload).to(self.device).eval()
        dtype = next((p.dtype for p in decoder.parameters()), torch.float32)
        inputs = decoder.example_inputs(dtype, self.device)

        def call() -> Any:
            with torch.inference_mode():
                return decoder(*inputs)

        return call

    def _sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()


class TorchCudaBackend(TorchBackend):
    name = "torch-cuda"
    device = "cuda"
    gpu = True


class OrtBackend(Backend):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"

    def _check(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SearcherError(
                f"--device {self.name} needs onnxruntime: pip install onnxruntime"
            ) from None
        # onnxruntime-gpu lists its CUDA provider even on a machine without a GPU
        no_gpu = self.gpu and not torch.cuda.is_available()
        if self.provider not in ort.get_available_providers() or no_gpu:
            raise SearcherError(
                f"--device {self.name}: ONNX Runtime here has no usable {self.provider} (it "
                f"has {', '.join(ort.get_available_providers())}"
                f"{'; no CUDA GPU is visible' if no_gpu else ''}); install onnxruntime-gpu on a "
                "machine with a CUDA GPU, or use ort-cpu"
            )

    def prepare(self, weights: DecoderWeights, workload: Workload) -> Callable[[], Any]:
        import onnxruntime as ort

        from latency_models.onnx_graph import build

        _shared_pool(self.threads)
        graph = build(weights, workload)
        opts = ort.SessionOptions()
        opts.use_per_session_threads = False  # one pool per process; see _shared_pool
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        names = list(graph.weights)
        device = "cuda" if self.gpu else "cpu"
        values = [ort.OrtValue.ortvalue_from_numpy(graph.weights[n], device, 0) for n in names]
        if names:
            opts.add_external_initializers(names, values)
        try:
            session = ort.InferenceSession(
                graph.model.SerializeToString(), opts, providers=[self.provider]
            )
        except Exception as exc:  # ORT raises its own exception types, or RuntimeError
            raise SearcherError(f"ONNX Runtime could not load the graph to time: {exc}") from None
        feed = {n: x.numpy() for n, x in zip(graph.inputs, example_inputs(weights, workload))}
        if not self.gpu:

            def call() -> Any:
                return session.run(None, feed)

            call.keep = values  # type: ignore[attr-defined]  # initializers outlive the session
            return call
        binding = session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for name in graph.outputs:
            binding.bind_output(name, "cuda")

        def call() -> Any:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        call.keep = values  # type: ignore[attr-defined]
        return call

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "onnxruntime": _version("onnxruntime")}


_ORT_POOL: list[int] = []  # threads of this process's ONNX Runtime pool, once it exists


def ort_options() -> Any:
    """ONNX Runtime session options that work in this process: once timing has made the
    process-wide thread pool, every session must use it (ORT refuses one with its own)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if _ORT_POOL:
        opts.use_per_session_threads = False
    return opts


def _shared_pool(threads: int) -> None:
    """Give every ONNX Runtime session of this process one shared thread pool.

    With a pool per session, the idle sessions' threads spin (ORT's default) while another
    session runs: timing graphs round-robin then doubles small graphs' latency on 2 cores
    (measured). One shared, spinning pool behaves like a single deployed session whichever
    session runs. Its size is fixed when the first session is made.
    """
    if _ORT_POOL:
        if _ORT_POOL[0] != threads:
            raise SearcherError(
                f"ONNX Runtime in this process already runs {_ORT_POOL[0]} threads; measure "
                f"with {threads} threads in a new process"
            )
        return
    from onnxruntime.capi import _pybind_state

    try:
        _pybind_state.set_global_thread_pool_sizes(threads, 1)
    except RuntimeError as exc:  # ORT's pools exist already (something else made a session)
        raise SearcherError(
            f"cannot give ONNX Runtime {threads} threads in this process ({exc}); measure in a "
            "new process"
        ) from None
    _ORT_POOL.append(threads)


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    gpu = True


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (OrtBackend, TorchBackend, OrtCudaBackend, TorchCudaBackend)
}


def backend(name: str, threads: int | None = None) -> Backend:
    if name not in BACKENDS:
        raise SearcherError(f"unknown latency device {name!r}: choose one of {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise SearcherError("--threads must be at least 1")
    return BACKENDS[name](threads)
