"""Run an exported cached model with ONNX Runtime: needs onnxruntime and numpy, not torch.

The cache state stays in two preallocated ``OrtValue`` buffers on the execution provider's
device. Two IOBindings per CFG slot, made once, each read one buffer and write the other;
calls alternate between them (ping-pong), so a GPU provider never copies cache state to the
host and a step only rebinds its user inputs and controls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError
from ..stepping import StepTracker, call_timestep
from .manifest import read_manifest
from .requests import PerThreadRequests, RequestState, reused_sites

_NUMPY_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": None,
    "int64": np.int64, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8,
}

# The type strings ONNX Runtime reports for a graph input, by manifest dtype name.
_ORT_TYPES = {
    "float32": "tensor(float)", "float16": "tensor(float16)", "float64": "tensor(double)", "bfloat16": "tensor(bfloat16)",
    "int64": "tensor(int64)", "int32": "tensor(int32)", "bool": "tensor(bool)", "uint8": "tensor(uint8)",
}

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _np_dtype(name: str) -> Any:
    dtype = _NUMPY_DTYPES.get(name)
    if dtype is None:
        raise ArtifactError(f"dtype {name} is not supported by the ONNX Runtime loader")
    return dtype


def choose_providers(provider: str, available: list[str]) -> list[str]:
    """The provider list for ``provider`` (``auto``, ``cpu``, ``cuda``, ``tensorrt`` or an ORT name)."""
    if provider in ("auto", "onnxruntime"):
        preferred = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        return [*preferred, "CPUExecutionProvider"]
    name = PROVIDER_ALIASES.get(provider, provider)
    if name not in available:
        raise ArtifactError(
            f"execution provider {name} is not available in this onnxruntime (available: {available}); "
            "install onnxruntime-gpu for CUDA / TensorRT, or use provider='cpu'"
        )
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


class OnnxEngine:
    """An exported cached model served by ONNX Runtime, with the runtime's step logic.

    Call it with the model's tensor inputs as numpy arrays, by name (``engine(x=..., timestep=...,
    class_labels=...)``); it returns a dict of output name -> numpy array. Steps, CFG slots and
    generations are recognised from the timestep input exactly as ``adacache.compile`` does.

    Threads may share an engine: each thread has its own request (step tracker, caches and
    reuse counters, see :mod:`adacache.deploy.requests`), and a call that fails inside ONNX
    Runtime leaves its thread's request as it was.
    """

    def __init__(self, directory: str | Path, provider: str = "auto", session_options: Any = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        providers = choose_providers(provider, ort.get_available_providers())
        model_file = self.directory / self.manifest["model_file"]
        try:
            self.session = ort.InferenceSession(str(model_file), session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises a different class per cause; all mean the same here
            raise ArtifactError(
                f"ONNX Runtime cannot load {model_file} ({type(exc).__name__}: {exc}); the file is corrupt or uses an operator "
                "this ONNX Runtime cannot run: re-export it (adacache.export checks that what it writes loads and computes "
                "what the compiled model computes)"
            ) from exc
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self._ort = ort
        self.inputs = [i for i in self.manifest["inputs"] if i["role"] == "user"]
        self.outputs = [o for o in self.manifest["outputs"] if o["role"] == "user"]
        self._flags = {v: self._device_value(np.array(v)) for v in (False, True)}
        self.requests: PerThreadRequests[_SlotBuffers] = PerThreadRequests(
            [c["site"] for c in self.manifest["controls"]], lambda: _SlotBuffers(self._bind_slot()))
        self._check_model_io()

    # -- this thread's request ------------------------------------------------------------
    @property
    def request(self) -> RequestState["_SlotBuffers"]:
        """The calling thread's request state."""
        return self.requests.current()

    @property
    def tracker(self) -> StepTracker:
        """The calling thread's step tracker."""
        return self.request.tracker

    @property
    def reused(self) -> dict[str, int]:
        """Reuses per site in the calling thread's calls."""
        return self.request.reused

    @property
    def calls(self) -> int:
        """Calls made by the calling thread that ran."""
        return self.request.calls

    # -- setup --------------------------------------------------------------------------
    def _check_model_io(self) -> None:
        """The model file is the authority: every manifest input must be what it declares."""
        graph_inputs = self.session.get_inputs()
        expected = [i["name"] for i in self.manifest["inputs"]]
        if [i.name for i in graph_inputs] != expected:
            raise ArtifactError(
                f"model inputs {[i.name for i in graph_inputs]} do not match the manifest's {expected}; re-export the artifact"
            )
        for index, (spec, declared) in enumerate(zip(self.manifest["inputs"], graph_inputs)):
            want_type = _ORT_TYPES.get(spec["dtype"])
            if declared.type != want_type:
                raise ArtifactError(
                    f"manifest inputs.{index}.dtype is {spec['dtype']!r} but {self.manifest['model_file']} takes "
                    f"'{spec['name']}' as {declared.type}; re-export the artifact"
                )
            static = [d if isinstance(d, int) else None for d in declared.shape]
            if len(static) != len(spec["shape"]) or any(d is not None and d != s for d, s in zip(static, spec["shape"])):
                raise ArtifactError(
                    f"manifest inputs.{index}.shape is {spec['shape']} but {self.manifest['model_file']} takes "
                    f"'{spec['name']}' with shape {declared.shape}; re-export the artifact"
                )

    def _device_value(self, array: np.ndarray) -> Any:
        # np.ascontiguousarray would turn a 0-d flag into shape (1,): copy only when needed.
        dense = array if array.flags.c_contiguous else array.copy(order="C")
        return self._ort.OrtValue.ortvalue_from_numpy(dense, self.device, 0)

    def _initial_state(self) -> list[Any]:
        # Allocated from arrays (not from a shape) so that 0-d flags keep their 0-d shape.
        values = []
        for state in self.manifest["states"]:
            init = np.zeros(state["shape"], dtype=_np_dtype(state["dtype"]))
            values.append(self._device_value(init))
        return values

    # -- calling ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the caches; the next call starts a new request (same as :meth:`new_request`)."""
        self.new_request()

    def new_request(self, total_steps: int | None = None) -> None:
        """The next call starts a new request: nothing cached before it is reused, whatever
        its timestep. Call it before each generation when the engine serves several (it
        applies to the calling thread's request); ``total_steps``, the number of steps the
        request runs, lets a schedule anchored to the end place its full steps and ends the
        request after its last step, as a compiled pipeline call does."""
        self.request.begin_request(total_steps)

    def _check_inputs(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        names = [i["name"] for i in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown or missing:
            raise ArtifactError(f"inputs do not match the artifact: missing {missing}, unknown {unknown}; expected {names}")
        arrays = {}
        for spec in self.inputs:
            value = np.asarray(feeds[spec["name"]])
            want = _np_dtype(spec["dtype"])
            if value.dtype != want:
                raise ArtifactError(f"input '{spec['name']}' has dtype {value.dtype}, the artifact expects {np.dtype(want)}")
            if list(value.shape) != list(spec["shape"]):
                raise ArtifactError(
                    f"input '{spec['name']}' has shape {list(value.shape)}, the artifact was exported for {spec['shape']}; "
                    "export another artifact for this shape"
                )
            arrays[spec["name"]] = value
        return arrays

    def _timestep(self, arrays: dict[str, np.ndarray]) -> float | None:
        name = self.manifest.get("timestep_input")
        if name is None:
            return None
        value = arrays[name].reshape(-1)
        if not value.size:
            return None
        return call_timestep(float(value.min()), float(value.max()), ArtifactError)

    def __call__(self, **feeds: Any) -> dict[str, np.ndarray]:
        arrays = self._check_inputs(feeds)
        planned = self.requests.plan(self._timestep(arrays))  # committed only once the run succeeded
        buffers = planned.buffers
        binding = buffers.bindings[buffers.parity]

        for name, array in arrays.items():
            if self.device == "cpu":
                binding.bind_cpu_input(name, np.ascontiguousarray(array) if array.ndim else array)  # no OrtValue to build: ORT reads the array in place
            else:
                binding.bind_ortvalue_input(name, self._device_value(array))
        schedules = self.manifest["schedules"]
        forecast = self.manifest.get("forecast")
        if forecast:
            coef, update = planned.forecast_controls(self.manifest)
            binding.bind_ortvalue_input(forecast["coef"], self._device_value(np.asarray(coef, dtype=np.float32)))
            binding.bind_ortvalue_input(forecast["update"], self._device_value(np.asarray(update, dtype=np.float32)))
        for control in self.manifest["controls"]:
            allowed = planned.allow_reuse(schedules[control["site"]])
            binding.bind_ortvalue_input(control["name"], self._flags[allowed])
        self.session.run_with_iobinding(binding)
        results = binding.get_outputs()
        n_user = len(self.outputs)
        n_state = len(self.manifest["states"])
        # On CPU, numpy() is a view of the output buffer, which the binding hands to ORT again two
        # calls later: copy, or a result the caller kept would change under it. (On a GPU
        # provider numpy() already copies to the host.)
        user = {o["name"]: _owned(v.numpy(), self.device) for o, v in zip(self.outputs, results[:n_user])}
        reused = reused_sites(self.manifest["signals"], [v.numpy() for v in results[n_user + n_state :]])
        buffers.parity ^= 1  # the outputs just written are the next call's inputs
        planned.commit(buffers, reused)
        return user

    def _bind_slot(self) -> tuple[Any, Any]:
        """Two bindings over two state buffers, each reading one and writing the other.

        Bound once per CFG slot and generation, so a step only rebinds its user inputs and
        controls; alternating between the two is the ping-pong of the cache state.
        """
        buffers = (self._initial_state(), self._initial_state())
        bindings = []
        for read, write in (buffers, buffers[::-1]):
            binding = self.session.io_binding()
            for state, value in zip(self.manifest["states"], read):
                binding.bind_ortvalue_input(state["name"], value)
            # Outputs are bound in the graph's output order: get_outputs() returns that order.
            for out in self.outputs:
                binding.bind_output(out["name"], self.device)
            for state, value in zip(self.manifest["states"], write):
                binding.bind_ortvalue_output(state["output"], value)
            for signal in self.manifest["signals"]:
                binding.bind_output(signal["name"], "cpu")
            bindings.append(binding)
        return bindings[0], bindings[1]


def _owned(array: np.ndarray, device: str) -> np.ndarray:
    return array.copy() if device == "cpu" else array


class _SlotBuffers:
    """One CFG slot's two IOBindings and which of them the next call uses."""

    def __init__(self, bindings: tuple[Any, Any]) -> None:
        self.bindings = bindings
        self.parity = 0
