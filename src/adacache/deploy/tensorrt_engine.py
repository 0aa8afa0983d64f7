"""Run a serialized TensorRT engine with adacache's step logic and ping-pong cache buffers.

Device buffers are torch CUDA tensors (a TensorRT deployment has a CUDA GPU and torch or
cuda-python anyway); tensor addresses are set per call with ``set_tensor_address``, and the
input and output cache buffers swap after each call, so cache state never leaves the GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, SessionError
from ..stepping import StepTracker, call_timestep
from .manifest import read_manifest
from .requests import PerThreadRequests, reused_sites


class TensorRTEngine:
    """Same calling convention as :class:`~adacache.deploy.onnx_engine.OnnxEngine`.

    One thread per engine: a TensorRT execution context is not thread-safe, so a call from a
    thread other than the first caller's raises :class:`~adacache.SessionError` (load one
    engine per thread). A call that fails leaves the request as it was.
    """

    def __init__(self, directory: str | Path) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise ArtifactError("running a TensorRT engine needs `tensorrt` and torch with CUDA: pip install 'adacache[gpu]'") from exc
        if not torch.cuda.is_available():
            raise ArtifactError("this artifact is a TensorRT engine and needs a CUDA GPU; load the ONNX artifact with provider='cpu' instead")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((self.directory / self.manifest["model_file"]).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {self.manifest['model_file']} (built with another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.provider = "TensorRT"
        self.inputs = [i for i in self.manifest["inputs"] if i["role"] == "user"]
        self.outputs = [o for o in self.manifest["outputs"] if o["role"] == "user"]
        self._flags = {v: torch.tensor(v, device="cuda") for v in (False, True)}
        self.requests: PerThreadRequests[tuple[list[Any], list[Any]]] = PerThreadRequests(
            [c["site"] for c in self.manifest["controls"]], lambda: (self._buffers(), self._buffers()))
        self._owner: int | None = None
        self._check_engine_io()

    @property
    def tracker(self) -> StepTracker:
        """The request's step tracker."""
        return self.requests.current().tracker

    @property
    def reused(self) -> dict[str, int]:
        """Reuses per site."""
        return self.requests.current().reused

    def _check_thread(self) -> None:
        ident = threading.get_ident()
        if self._owner is None:
            self._owner = ident
        elif self._owner != ident:
            raise SessionError(
                "this TensorRTEngine is used by another thread: a TensorRT execution context is not thread-safe, "
                "and the request it serves is that thread's. Load one engine per thread (adacache.load(path) in each)"
            )

    def _check_engine_io(self) -> None:
        """The engine is the authority: every manifest input must be a tensor it takes, as declared."""
        for index, spec in enumerate(self.manifest["inputs"]):
            try:
                shape = list(self.engine.get_tensor_shape(spec["name"]))
            except Exception as exc:  # noqa: BLE001 - TensorRT raises its own types for an unknown name
                raise ArtifactError(f"manifest inputs.{index}: the engine has no tensor '{spec['name']}'; re-export the artifact") from exc
            if len(shape) != len(spec["shape"]) or any(d >= 0 and d != s for d, s in zip(shape, spec["shape"])):
                raise ArtifactError(
                    f"manifest inputs.{index}.shape is {spec['shape']} but the engine takes '{spec['name']}' with shape {shape}; "
                    "re-export the artifact"
                )

    def _dtype(self, name: str) -> Any:
        return getattr(self._torch, name)

    def _buffers(self) -> list[Any]:
        return [self._torch.zeros(s["shape"], dtype=self._dtype(s["dtype"]), device="cuda") for s in self.manifest["states"]]

    def reset(self) -> None:
        """Forget the caches; the next call starts a new request (same as :meth:`new_request`)."""
        self.new_request()

    def new_request(self, total_steps: int | None = None) -> None:
        """The next call starts a new request, whatever its timestep; ``total_steps`` as in
        the ONNX engine."""
        self._check_thread()
        self.requests.current().begin_request(total_steps)

    @staticmethod
    def _row_timestep(value: Any) -> float | None:
        flat = value.reshape(-1)
        if not flat.numel():
            return None
        low, high = (float(v) for v in flat.aminmax())
        return call_timestep(low, high, ArtifactError)

    def __call__(self, **feeds: Any) -> dict[str, Any]:
        self._check_thread()
        torch = self._torch
        names = [i["name"] for i in self.inputs]
        if sorted(feeds) != sorted(names):
            raise ArtifactError(f"inputs do not match the artifact: got {sorted(feeds)}, expected {names}")
        tensors = {}
        for spec in self.inputs:
            value = torch.as_tensor(feeds[spec["name"]]).to("cuda")
            if list(value.shape) != spec["shape"] or str(value.dtype).replace("torch.", "") != spec["dtype"]:
                raise ArtifactError(f"input '{spec['name']}' is {value.dtype}{list(value.shape)}, the artifact expects {spec['dtype']}{spec['shape']}")
            tensors[spec["name"]] = value.contiguous()
        timestep = self.manifest.get("timestep_input")
        planned = self.requests.plan(self._row_timestep(tensors[timestep]) if timestep else None)  # committed after the run
        current, spare = planned.buffers
        ctx = self.context
        for name, value in tensors.items():
            ctx.set_tensor_address(name, value.data_ptr())
        forecast = self.manifest.get("forecast")
        keep_alive = []
        if forecast:
            coef, update = planned.forecast_controls(self.manifest)
            for name, values in ((forecast["coef"], coef), (forecast["update"], update)):
                tensor = torch.tensor(values, dtype=torch.float32, device="cuda")
                keep_alive.append(tensor)
                ctx.set_tensor_address(name, tensor.data_ptr())
        for control in self.manifest["controls"]:
            allowed = planned.allow_reuse(self.manifest["schedules"][control["site"]])
            ctx.set_tensor_address(control["name"], self._flags[allowed].data_ptr())
        for state, cur, nxt in zip(self.manifest["states"], current, spare):
            ctx.set_tensor_address(state["name"], cur.data_ptr())
            ctx.set_tensor_address(state["output"], nxt.data_ptr())
        outputs = {}
        for out in self.outputs:
            shape = tuple(self.engine.get_tensor_shape(out["name"]))
            dtype = self._torch_dtype(self.engine.get_tensor_dtype(out["name"]))
            outputs[out["name"]] = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(out["name"], outputs[out["name"]].data_ptr())
        signals = {}
        for signal in self.manifest["signals"]:
            shape = tuple(self.engine.get_tensor_shape(signal["name"]))
            dtype = self._torch_dtype(self.engine.get_tensor_dtype(signal["name"]))
            signals[signal["name"]] = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(signal["name"], signals[signal["name"]].data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed")
        self.stream.synchronize()
        reused = reused_sites(self.manifest["signals"], [signals[s["name"]] for s in self.manifest["signals"]])
        planned.commit((spare, current), reused)
        return {k: v.cpu().numpy() for k, v in outputs.items()}

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        import tensorrt as trt

        mapping = {trt.float32: self._torch.float32, trt.float16: self._torch.float16, trt.bfloat16: self._torch.bfloat16,
                   trt.int32: self._torch.int32, trt.int64: self._torch.int64, trt.bool: self._torch.bool}
        return mapping[trt_dtype]
