"""The one call of the network at a precision and memory layout, for training and inference alike.

`run_network` is the only function that calls a SuperPoint network at a configured precision: it moves
the images to the device, lays them out channels-last when asked, runs the network under the autocast
of `utils.precision` and returns its outputs in fp32 (softmax, NMS, descriptor normalisation and losses
always run in fp32). It keeps gradients: training calls it as it is, inference inside
`torch.inference_mode()`.

A backend is an object that turns (B, 1, H, W) float images in [0, 1] into {'semi': (B, 65, H/8, W/8),
'desc': (B, D, H/8, W/8)} fp32 tensors on its `device`, and says its `precision` (as configured),
`concrete_precision` and `channels_last`. `TorchBackend` runs a PyTorch module; other runtimes (an
exported ONNX graph, ...) plug in as further classes with the same call and attributes, registered in
`BACKENDS` under the name a config gives.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from utils import precision as precision_lib


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

    def __call__(self, images: torch.Tensor, module: Optional[nn.Module] = None) -> dict:
        """images (B, 1, H, W) -> fp32 outputs of the network, or of `module` (e.g. its DDP wrapper)."""
        return run_network(module if module is not None else self.net, images, self.precision,
                           self.channels_last, self.device)


BACKENDS = {"torch": TorchBackend}
