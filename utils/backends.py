"""The one call of the network at a precision and memory layout, for training and inference alike.

`run_network` is the only function that calls a SuperPoint network at a configured precision: it moves
the images to the device, lays them out channels-last when asked, runs the network under the autocast
of `utils.precision` and returns its outputs in fp32 (softmax, NMS, descriptor normalisation and losses
always run in fp32). It keeps gradients: training calls it as it is, inference inside
`torch.inference_mode()`.

A backend is an object that turns (B, 1, H, W) float images in [0, 1] into {'semi': (B, 65, H/8, W/8),
'desc': (B, D, H/8, W/8)} fp32 tensors on its `device`, and says its `precision` (as configured),
`concrete_precision` (what really ran) and `channels_last`. `model.backend` names one of `BACKENDS`:
  torch        the PyTorch module under autocast (any device; training uses it)
  onnxruntime  the network exported to ONNX (`write_onnx`), run by ONNX Runtime on the CPU, fp32 (its CPU
               kernels have no bf16 convolutions): faster than PyTorch's fp32 convolutions
  openvino     the same ONNX graph compiled by OpenVINO for the CPU, fp32 or bf16 (its inference
               precision hint); on CPUs with AMX / AVX512-BF16 its bf16 is several times faster than
               PyTorch's bf16 autocast
  auto         `auto_backend`: what benchmarks/inference.py measured fastest for the device and precision
Every backend's outputs are fp32 torch tensors, so post-processing (utils.keypoints) is shared.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from utils import precision as precision_lib
from utils.keypoints import logits_to_heatmap

log = logging.getLogger(__name__)


NETWORK_HEADS = ("semi", "desc")  # the network's outputs; a backend may be asked for a subset (`heads`)


def run_network(net: nn.Module, images: torch.Tensor, precision: str = "fp32", channels_last: bool = False,
                device: torch.device | str | None = None) -> dict:
    """net(images) at `precision` (fp32 | bf16 | fp16 | auto, utils.precision), its outputs in fp32.

    images: (B, C, H, W) float; moved to `device` (default: the device of the net's parameters) and
    made channels-last when `channels_last`. net: any module returning a dict of tensors (a
    DistributedDataParallel wrapper too). Returns {name: fp32 tensor} with gradients unless disabled.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    x = images.to(device, dtype=torch.float32, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with precision_lib.autocast(precision, device):
        out = net(x)
    return {key: value.float() for key, value in out.items()}


class TorchBackend:
    """A PyTorch network on a device at a precision and memory layout.

    precision: fp32 | bf16 | fp16 | auto; one the device cannot run (fp16 on the CPU) is a ValueError.
    channels_last: True, False or 'auto' (`utils.precision.use_channels_last`). The network is moved to
    the device and, with channels-last, converted to that layout (in place, as `nn.Module.to`).
    """

    name = "torch"

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 channels_last: bool | str = "auto"):
        self.device = torch.device(device)
        self.precision = precision
        self.concrete_precision = precision_lib.resolve(precision, self.device)
        if channels_last == "auto":
            channels_last = precision_lib.use_channels_last(precision, self.device)
        self.channels_last = bool(channels_last)
        self.net = net.to(self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor, module: Optional[nn.Module] = None, heads=NETWORK_HEADS) -> dict:
        """images (B, 1, H, W) -> fp32 outputs of the network, or of `module` (e.g. its DDP wrapper). The
        module computes all its heads whatever `heads` asks for, and all are returned."""
        return run_network(module if module is not None else self.net, images, self.precision,
                           self.channels_last, self.device)


ONNX_OPSET = 17


class OnnxGraph(nn.Module):
    """A SuperPoint network with positional outputs for ONNX: image -> (semi or heatmap, descriptors)."""

    def __init__(self, net: nn.Module, heatmap: bool = False):
        super().__init__()
        self.net, self.heatmap = net, heatmap

    def forward(self, image: torch.Tensor):
        out = self.net(image)
        return (logits_to_heatmap(out["semi"]) if self.heatmap else out["semi"]), out["desc"]


def onnx_output_names(heatmap: bool = False) -> list[str]:
    return ["heatmap" if heatmap else "semi", "descriptors"]


def write_onnx(net: nn.Module, path: str | Path, heatmap: bool = False, opset: int = ONNX_OPSET) -> None:
    """Write `net` in fp32 inference mode (BatchNorm folded) to `path` as ONNX, with input `image`
    (B, 1, H, W) and outputs `onnx_output_names(heatmap)`, batch, height and width dynamic."""
    first = onnx_output_names(heatmap)[0]
    cells = {0: "batch", 2: "cells_y", 3: "cells_x"}
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "descriptors": cells,
            first: {0: "batch", 1: "height", 2: "width"} if heatmap else cells}
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings():
            # The torch.export-based exporter needs onnxscript and guards on the /8 sizes; the TorchScript
            # exporter writes this plain convolutional network with dynamic axes directly.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(OnnxGraph(net, heatmap), (torch.zeros(1, 1, 64, 64),), str(path),
                              input_names=["image"], output_names=onnx_output_names(heatmap), dynamic_axes=axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        net.train(was_training)


class _OnnxBackend:
    """Shared part of the backends that run the network's ONNX graph on the CPU: the export (once, at
    the first call, so the network is in its final state), numpy in and fp32 torch tensors out."""

    name = ""

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 channels_last: bool | str = "auto"):
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"model.backend {self.name!r} runs on the CPU; use 'torch' (or 'auto') on {self.device}")
        self.precision = precision
        self.requested_precision = precision_lib.resolve(precision, self.device)
        self.concrete_precision = self.requested_precision
        self.channels_last = False  # the runtime chooses its own layouts
        self.net = net.to(self.device)
        self.threads = torch.get_num_threads()
        self._runtime = None

    def _compile(self, onnx_path: Path):
        raise NotImplementedError

    def _run(self, images: np.ndarray, names: list) -> list:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, module: Optional[nn.Module] = None, heads=NETWORK_HEADS) -> dict:
        """images (B, 1, H, W) -> {head: fp32 CPU tensor} for `heads` ('semi', 'desc'). `module` is not
        supported: the graph is the exported network (training uses the torch backend)."""
        if module is not None and module is not self.net:
            raise ValueError(f"backend {self.name!r} runs its exported network only")
        if self._runtime is None:
            with tempfile.TemporaryDirectory() as folder:
                write_onnx(self.net, Path(folder) / "net.onnx")
                self._runtime = self._compile(Path(folder) / "net.onnx")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = self._run(x, [dict(zip(NETWORK_HEADS, onnx_output_names()))[head] for head in heads])
        # Each runtime hands over arrays of its own (OpenVINO's are copied out of its buffers): no second copy.
        return {head: torch.from_numpy(np.asarray(out, dtype=np.float32)) for head, out in zip(heads, outputs)}


class OnnxRuntimeBackend(_OnnxBackend):
    """ONNX Runtime on the CPU, always fp32 (a requested bf16 runs in fp32, said by `concrete_precision`)."""

    name = "onnxruntime"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.requested_precision != "fp32":
            log.warning("model.backend onnxruntime runs in fp32 (its CPU kernels have no %s convolutions)",
                        self.requested_precision)
        self.concrete_precision = "fp32"

    def _compile(self, onnx_path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        # Reads the file into the session: the temporary file may go after this.
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def _run(self, images: np.ndarray, names: list) -> list:
        return self._runtime.run(names, {"image": images})


class OpenVinoBackend(_OnnxBackend):
    """OpenVINO on the CPU at fp32 or bf16 (its inference precision hint), compiled for each input shape
    (static shapes compile to the fastest kernels) and set of outputs (the detector head alone, as the
    label export asks, skips the descriptor head: 7 % faster at 240x320); the last `MAX_SHAPES` such
    compilations stay."""

    name = "openvino"
    MAX_SHAPES = 8

    def _compile(self, onnx_path: Path):
        import openvino as ov

        self._core = ov.Core()
        self._compiled = collections.OrderedDict()  # ((B, 1, H, W), output names) -> infer request
        return self._core.read_model(str(onnx_path))

    def _request(self, shape: tuple, names: list):
        import openvino as ov

        key = (shape, tuple(names))
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self._runtime.clone()
        model.reshape({"image": list(shape)})
        if list(names) != onnx_output_names():  # a subgraph: what the outputs asked for need, nothing more
            model = ov.Model([model.output(name) for name in names], model.get_parameters())
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.requested_precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        compiled = self._core.compile_model(model, "CPU", config)
        used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # 'f32' or 'bf16'
        self.concrete_precision = "bf16" if used == "bf16" else "fp32"
        self._compiled[key] = compiled.create_infer_request()
        while len(self._compiled) > self.MAX_SHAPES:
            self._compiled.popitem(last=False)
        return self._compiled[key]

    def _run(self, images: np.ndarray, names: list) -> list:
        request = self._request(tuple(images.shape), names)
        request.infer({"image": images})
        # The request owns its output buffers (reused by the next call): callers get copies.
        return [request.get_tensor(name).data.copy() for name in names]


BACKENDS = {"torch": TorchBackend, "onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend}
BACKEND_NAMES = (*BACKENDS, "auto")


def installed(name: str) -> bool:
    """Whether backend `name`'s package is importable (torch always is)."""
    return name == "torch" or importlib.util.find_spec(name) is not None


def auto_backend(device: torch.device | str, precision: str) -> str:
    """The fastest backend measured by benchmarks/inference.py for the device and precision: on the CPU,
    OpenVINO where the precision is bf16 (CPUs with bf16 units: 2-3x PyTorch's bf16), ONNX Runtime in
    fp32 (1.2-1.5x PyTorch's channels-last fp32); PyTorch on GPUs and where the package is absent."""
    device = torch.device(device)
    if device.type != "cpu":
        return "torch"
    choice = "openvino" if precision_lib.resolve(precision, device) == "bf16" else "onnxruntime"
    return choice if installed(choice) else "torch"


def make_backend(name: str, net: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
                 channels_last: bool | str = "auto"):
    """The backend `name` (`BACKEND_NAMES`; auto: `auto_backend`) running `net`. An unknown name or a
    backend whose package is not installed is a ValueError naming `model.backend`."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"model.backend is {name!r}; expected one of {list(BACKEND_NAMES)}")
    if name == "auto":
        name = auto_backend(device, precision)
    elif not installed(name):
        raise ValueError(f"model.backend is {name!r} but the package is not installed (pip install {name}); "
                         f"or use 'torch'")
    return BACKENDS[name](net, device, precision, channels_last)
