"""`export.py export_onnx`: the network as an ONNX file, for ONNX Runtime, OpenVINO, TensorRT, C++ or mobile.

Writes EXPER_PATH/<exper>/superpoint.onnx (or --output) with dynamic batch, height and width:
  input   image        (B, 1, H, W) float32 grey in [0, 1], H and W multiples of 8
  outputs semi         (B, 65, H/8, W/8) float32 detector logits                  (default)
          heatmap      (B, H, W) float32 keypoint probability                     (--heatmap: softmax over
                       the 65 channels, dustbin dropped, depth-to-space, as utils.keypoints.logits_to_heatmap)
          descriptors  (B, 256, H/8, W/8) float32 unit-norm descriptor map
NMS, top-k, sub-pixel refinement and descriptor sampling stay outside the file (utils.keypoints), as
they are data-dependent loops that the ONNX graph would run slowly or not at all.

The file is validated before it is moved into place: ONNX's checker, then ONNX Runtime against PyTorch
on a real photograph (--image, default scikit-image's `camera`) at 240x320 and 480x640 (so the dynamic
axes are exercised): the maximum heatmap difference must be <= 1e-4 and the keypoints (the config's
detection_threshold, nms, remove_borders, top_k; integer positions) the same points (two scores within ~1e-7 may swap
their rank), else the export fails and writes nothing.
export_onnx.json records the differences, the versions and the settings.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

import settings
from models import extractor as extractor_lib
from utils import runs
from utils.backends import ONNX_OPSET, onnx_output_names, write_onnx
from utils.config import ConfigError, dump_config, load_yaml, merge
from utils.images import read_image
from utils.io import DataError, write_json
from utils.keypoints import logits_to_heatmap

log = logging.getLogger(__name__)

VALIDATION_SIZES = ((240, 320), (480, 640))
MAX_HEATMAP_DIFFERENCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="weights file (overrides model.pretrained / pretrained)")
    parser.add_argument("--heatmap", action="store_true",
                        help="output the keypoint heatmap (B, H, W) instead of the logits (B, 65, H/8, W/8)")
    parser.add_argument("--output", help="ONNX file to write (default EXPER_PATH/<exper>/superpoint.onnx)")
    parser.add_argument("--image", help="image to validate the export on (default: scikit-image's camera)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")


def validation_image(path: str | None) -> np.ndarray:
    """The grey uint8 photograph the export is validated on."""
    if path:
        return read_image(path)
    from skimage import data  # a real photograph that ships with the package

    return data.camera()


def compare(net: nn.Module, session, image: np.ndarray, heatmap_output: bool, model: dict) -> dict:
    """ONNX Runtime vs PyTorch (fp32) at each validation size: max differences, keypoint agreement."""
    rows, pixels = [], {**model, "subpixel": {**model["subpixel"], "enable": False}}  # compared exactly
    for h, w in VALIDATION_SIZES:
        x = torch.from_numpy(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255)
        x = x[None, None]
        with torch.inference_mode():
            ref = net(x)
        first, desc = session.run(onnx_output_names(heatmap_output), {"image": x.numpy()})
        got_heat = torch.from_numpy(first) if heatmap_output else logits_to_heatmap(torch.from_numpy(first))
        ref_heat = logits_to_heatmap(ref["semi"])
        ref_kp = extractor_lib.keypoints_from_heatmap(ref_heat, pixels)[0][0]
        got_kp = extractor_lib.keypoints_from_heatmap(got_heat, pixels)[0][0]
        rows.append({"size": [h, w], "max_heatmap_difference": float((got_heat - ref_heat).abs().max()),
                     "max_descriptor_difference": float(np.abs(desc - ref["desc"].numpy()).max()),
                     "keypoints": len(ref_kp), "identical_keypoints": same_points(ref_kp, got_kp)})
    return {"sizes": rows, "ok": all(r["max_heatmap_difference"] <= MAX_HEATMAP_DIFFERENCE and r["identical_keypoints"]
                                     for r in rows)}


def same_points(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same (N, 2) points, in any order: scores equal to ~1e-7 may swap their rank."""
    return a.shape == b.shape and torch.equal(torch.unique(a, dim=0), torch.unique(b, dim=0))


def load_model_conf(args) -> dict:
    """The config's `model` keys the extractor knows (other sections and training keys are ignored)."""
    raw = load_yaml(args.config)
    model = {k: v for k, v in (raw.get("model") or {}).items() if k in extractor_lib.default_conf}
    model = merge(extractor_lib.default_conf, model, source=str(args.config), prefix="model.")
    model["pretrained"] = args.weights or model["pretrained"] or raw.get("pretrained")
    if not model["pretrained"]:
        raise ConfigError(f"{args.config}: no weights: set 'model.pretrained' (or 'pretrained'), or pass --weights")
    return model


def run(args) -> dict:
    import onnx
    import onnxruntime as ort

    model = load_model_conf(args)
    exper_dir = Path(settings.EXPER_PATH) / args.exper_name
    output = Path(args.output) if args.output else exper_dir / "superpoint.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    # One configuration per experiment folder (utils.runs): another one is refused unless --overwrite.
    plan = runs.plan_run(exper_dir, runs.make_record("export_onnx", {"model": model, "heatmap": args.heatmap,
                                                                     "opset": args.opset}, model["pretrained"]),
                         ("superpoint.onnx", "export_onnx.json"), resume=getattr(args, "resume", False),
                         overwrite=getattr(args, "overwrite", False), implicit_resume=True)
    plan.apply()
    net = extractor_lib.SuperPointExtractor({**model, "precision": "fp32", "channels_last": False}).net
    partial = output.with_name(output.name + ".partial")
    write_onnx(net, partial, args.heatmap, args.opset)
    try:
        onnx.checker.check_model(str(partial))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(partial), options, providers=["CPUExecutionProvider"])
        report = compare(net, session, validation_image(args.image), args.heatmap, model)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    report.update({"onnx": str(output), "outputs": onnx_output_names(args.heatmap), "opset": args.opset,
                   "weights": str(model["pretrained"]), "network": model["name"], "torch": torch.__version__,
                   "onnxruntime": ort.__version__, "image": args.image or "skimage.data.camera"})
    write_json(exper_dir / "export_onnx.json", report)
    if not report["ok"]:
        partial.unlink(missing_ok=True)
        raise DataError(f"{output}: ONNX Runtime disagrees with PyTorch (see {exper_dir / 'export_onnx.json'}): "
                        f"{report['sizes']}")
    os.replace(partial, output)
    dump_config(exper_dir / "config.yml", {"model": model, "heatmap": args.heatmap, "opset": args.opset})
    worst = max(r["max_heatmap_difference"] for r in report["sizes"])
    print(f"wrote {output} ({', '.join(report['outputs'])}; ONNX Runtime vs PyTorch: max heatmap difference "
          f"{worst:.1e}, identical keypoints at {' and '.join('x'.join(map(str, s)) for s in VALIDATION_SIZES)})")
    return report
