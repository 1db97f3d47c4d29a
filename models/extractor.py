"""The extractor: network + keypoint post-processing -> keypoints, scores and descriptors.

Every inference path (HPatches export, homography adaptation, feature export, demos) goes through
`SuperPointExtractor`: its network runs through `utils.backends` (the one call of the network at a
precision and memory layout, shared with training) and its keypoints come from
`keypoints_from_heatmap` (the model config's threshold, NMS, border, top-k and sub-pixel settings).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from models import SHIPPED_SUPERPOINT, get_model, shipped_weights
from utils.backends import NETWORK_HEADS, make_backend
from utils.checkpoints import extract_state_dict, load_checkpoint, load_weights_into
from utils.config import OPEN, check_int, check_number, merge
from utils.io import DataError
from utils.keypoints import DESCRIPTOR_SAMPLING, extract_keypoints, logits_to_heatmap, sample_descriptors
from utils.matching import nearest_neighbour_matches

log = logging.getLogger(__name__)

default_conf = {
    "name": "SuperPointNet_gauss2",
    "params": OPEN,
    "pretrained": None,
    "detection_threshold": 0.015,
    "nms": 4,
    "top_k": 0,  # 0 keeps every point
    "remove_borders": 4,
    "subpixel": {"enable": False, "patch_size": 5},
    "nn_thresh": 0.7,
    # exact | superglue: where descriptors are read from the coarse map (utils.keypoints.sample_descriptors)
    "descriptor_sampling": "exact",
    "precision": "fp32",
    "backend": "torch",  # torch | onnxruntime | openvino | auto (utils.backends)
    "channels_last": "auto",  # true, false, or auto (see utils.precision.use_channels_last)
    "threads": "auto",  # CPU threads of the export commands: N or auto (utils.precision.set_threads)
}


def keypoints_from_heatmap(heatmap: torch.Tensor, conf: Mapping) -> list:
    """Keypoints of a heatmap (B, H, W) with the settings of a model config (`default_conf` keys:
    detection_threshold, nms, remove_borders, top_k, subpixel). Returns B pairs (points (N, 2) x, y,
    scores (N,)), points by decreasing score."""
    return extract_keypoints(heatmap, threshold=conf["detection_threshold"], nms_radius=conf["nms"],
                             border=conf["remove_borders"], top_k=conf["top_k"],
                             subpixel=conf["subpixel"]["enable"], patch_size=conf["subpixel"]["patch_size"])


def weights_path(conf: Mapping) -> str | None:
    """`model.pretrained`, else a top-level `pretrained` (the reference's configs use both)."""
    model = conf.get("model") or {}
    return model.get("pretrained") or conf.get("pretrained") or None


# Checks of the post-processing settings: (key, check, example). top_k 0 keeps every point.
_POSTPROCESSING_CHECKS = (("detection_threshold", partial(check_number, low=0, high=1), 0.015),
                          ("nms", partial(check_int, minimum=0), 4), ("remove_borders", partial(check_int, minimum=0), 4),
                          ("top_k", partial(check_int, minimum=0), 1000))


def default_weights() -> Path:
    """The project's shipped SuperPoint (pretrained/superpoint_mix.pth), for the feature export, the match
    demo and the Python API called without weights; says so in the log. Missing: a DataError."""
    path = shipped_weights(SHIPPED_SUPERPOINT)
    log.warning("no weights given: using the project's SuperPoint %s (see pretrained/README.md)", path)
    return path


def apply_overrides(conf: dict, weights=None, source: str = "config", **model_keys) -> dict:
    """A loaded config with the command line's model settings, in place: each `model_keys` value that is
    not None replaces `model.<key>`; `model.pretrained` becomes `weights`, else the config's weights
    (`weights_path`). The post-processing values are checked, a bad one blamed on `source` (the config
    file) or on the command line (`--top-k` for top_k). Returns conf."""
    for key, check, example in _POSTPROCESSING_CHECKS:
        if model_keys.get(key) is not None:
            model_keys[key] = check(model_keys[key], f"--{key.replace('_', '-')}", "command line", example=example)
        elif key in conf["model"]:
            conf["model"][key] = check(conf["model"][key], f"model.{key}", source, example=example)
    conf["model"].update({key: value for key, value in model_keys.items() if value is not None})
    conf["model"]["pretrained"] = weights or weights_path(conf)
    return conf


# ITU-R BT.601 luma weights of R, G, B: the weights of OpenCV's cvtColor, so a tensor converted here
# equals the same file read grey by utils.images.read_image (up to its uint8 rounding).
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def network_for_weights(path) -> str:
    """`model.name` of the network whose layout the weights file has: `SuperPointNet_pretrained` for
    MagicLeap's (`conv1a.weight`, ...), `SuperPointNet_gauss2` for the reference's (`inc.conv...`),
    plain state_dicts and reference checkpoints alike. Anything else is a DataError naming the file."""
    state = extract_state_dict(load_checkpoint(path), str(path))
    if "conv1a.weight" in state:
        return "SuperPointNet_pretrained"
    if any(k.startswith("inc.") for k in state):
        return "SuperPointNet_gauss2"
    raise DataError(f"{path}: weights of neither SuperPoint layout (MagicLeap's conv1a..., the reference's "
                    f"inc...); first keys: {sorted(state)[:4]}")


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grey or (B, 3, H, W) RGB, values in [0, 1] -> (B, 1, H, W) grey (GREY_WEIGHTS)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (B, 1, H, W) grey or "
                         f"(B, 3, H, W) RGB with values in [0, 1]")
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights[:, None, None]).sum(dim=1, keepdim=True)


def as_image_batch(images: torch.Tensor) -> torch.Tensor:
    """The images the Python API accepts, as a (B, C, H, W) float32 batch with values in [0, 1].

    images: a tensor (H, W), (C, H, W) or (B, C, H, W) with C = 1 (grey) or 3 (RGB); uint8 (0-255) or
    floating point (already in [0, 1], as LightGlue's `load_image` gives). Anything else is a ValueError.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images is a {type(images).__name__}; expected a torch.Tensor (H, W), (C, H, W) or "
                         f"(B, C, H, W), e.g. torch.from_numpy(array)")
    shape = tuple(images.shape)
    images = images[None, None] if images.dim() == 2 else images[None] if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images have shape {shape}; expected (H, W), (C, H, W) or (B, C, H, W) with C = 1 "
                         f"(grey) or 3 (RGB)")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif images.is_floating_point():
        images = images.float()
    else:
        raise ValueError(f"images have dtype {images.dtype}; expected uint8 (0-255) or float (0-1)")
    height, width = images.shape[-2:]
    if height < 8 or width < 8:
        raise ValueError(f"images of size {height}x{width} are too small: the network needs at least 8x8")
    return images


class SuperPointExtractor(nn.Module):
    """SuperPoint inference. conf: the `model` section of a config (see `default_conf`)."""

    def __init__(self, conf: Mapping | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.conf = merge(default_conf, conf, source="model")
        if self.conf["descriptor_sampling"] not in DESCRIPTOR_SAMPLING:
            raise ValueError(f"model.descriptor_sampling is {self.conf['descriptor_sampling']!r}; expected one "
                             f"of {', '.join(DESCRIPTOR_SAMPLING)}")
        self.device = torch.device(device)
        self.net = get_model(self.conf["name"], self.conf["params"])
        if self.conf["pretrained"]:
            load_weights_into(self.net, self.conf["pretrained"])
        self.backend = make_backend(self.conf["backend"], self.net, self.device, self.conf["precision"],
                                    self.conf["channels_last"])
        self.precision, self.channels_last = self.backend.precision, self.backend.channels_last
        self.net.eval()

    def train(self, mode: bool = True):
        # Inference only: BatchNorm always uses its running statistics (the reference never called eval).
        return super().train(False)

    @torch.no_grad()
    def run_network(self, images: torch.Tensor, heads=NETWORK_HEADS) -> dict:
        """images (B, 1, H, W) in [0, 1] -> {'semi': (B, 65, Hc, Wc) fp32, 'desc': (B, D, Hc, Wc) fp32},
        Hc = H // 8, Wc = W // 8: at sizes that are not multiples of 8 the network sees every pixel and its
        pooling drops the last H % 8 rows and W % 8 columns of cells (as in LightGlue and hloc). `heads`:
        the outputs needed (a backend may skip the others)."""
        if min(images.shape[-2:]) < 8:
            raise ValueError(f"images of size {tuple(images.shape[-2:])}: H and W must be at least 8")
        out = self.backend(images, heads=tuple(heads))
        return {head: out[head] for head in heads}

    @torch.no_grad()
    def heatmap(self, images: torch.Tensor) -> torch.Tensor:
        """Keypoint probability (B, H, W)."""
        return logits_to_heatmap(self.run_network(images, heads=("semi",))["semi"])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 1, H, W) float in [0, 1].

        Returns {'keypoints': B x (N, 2) x, y; 'keypoint_scores': B x (N,); 'descriptors': B x (N, D)
        unit vectors sampled at the returned (sub-pixel) keypoints; 'heatmap': (B, H, W);
        'dense_descriptors': (B, D, H/8, W/8)}.
        """
        out = self.run_network(images)
        heatmap = logits_to_heatmap(out["semi"])
        return self.postprocess(heatmap, out["desc"])

    def postprocess(self, heatmap: torch.Tensor, dense_descriptors: torch.Tensor) -> dict:
        """Keypoints and descriptors from a heatmap (B, H, W) and descriptor map (B, D, Hc, Wc)."""
        detections = keypoints_from_heatmap(heatmap, self.conf)
        keypoints = [k for k, _ in detections]
        mode = self.conf["descriptor_sampling"]
        descriptors = [sample_descriptors(dense_descriptors[i:i + 1], k[None], mode=mode)[0]
                       for i, k in enumerate(keypoints)]
        return {
            "keypoints": keypoints,
            "keypoint_scores": [s for _, s in detections],
            "descriptors": descriptors,
            "heatmap": heatmap,
            "dense_descriptors": dense_descriptors,
        }

    @classmethod
    def from_weights(cls, path=None, device: torch.device | str = "cpu", **conf) -> "SuperPointExtractor":
        """An extractor for a weights file, the network picked from its layout (`network_for_weights`);
        None: the project's shipped SuperPoint (`default_weights`).
        conf: other `model` keys (detection_threshold, nms, top_k, precision, ...).

        `descriptor_sampling` defaults to what the weights were trained with: 'superglue' for MagicLeap's
        layout (their descriptors then equal SuperGlue's, LightGlue's and hloc's, which those tools'
        pretrained matchers expect), 'exact' for this project's network."""
        path = path if path is not None else default_weights()
        name = network_for_weights(path)
        conf.setdefault("descriptor_sampling", "superglue" if name == "SuperPointNet_pretrained" else "exact")
        return cls({**conf, "name": name, "pretrained": str(path)}, device=device)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict:
        """LightGlue-style features of one image or a batch.

        images: a tensor (H, W), (C, H, W) or (B, C, H, W), C = 1 grey or 3 RGB, uint8 (0-255) or float
        (0-1); any H, W >= 8 (see `as_image_batch`). It is not resized (LightGlue's `extract` shrinks to
        1024 px by default; resize before calling to do the same). At sizes that are not multiples of 8
        the network sees the whole image, as in LightGlue and hloc, and the last H % 8 rows and W % 8
        columns get no keypoints (the network's pooling drops those partial cells).
        Returns, on the extractor's device, N the largest keypoint count of the batch:
          'keypoints'       (B, N, 2) float32 x, y pixels of the input (pixel centres at integers)
          'keypoint_scores' (B, N) float32, each image's points by decreasing score
          'descriptors'     (B, N, D) float32 unit vectors (D = 256)
          'image_size'      (B, 2) float32 [W, H] of the input
          'mask'            (B, N) bool, True for real keypoints; images with fewer than N points are
                            padded at the end with zero keypoints, scores and descriptors.
        Runs under torch.no_grad (not inference_mode): the outputs are ordinary tensors, so a matcher
        called on them may record gradients.
        """
        grey = to_grey(as_image_batch(images))
        height, width = grey.shape[-2:]
        pred = self.forward(grey)
        batch, n = grey.shape[0], max((len(k) for k in pred["keypoints"]), default=0)
        dim = pred["dense_descriptors"].shape[1]
        out = {
            "keypoints": torch.zeros(batch, n, 2, device=self.device),
            "keypoint_scores": torch.zeros(batch, n, device=self.device),
            "descriptors": torch.zeros(batch, n, dim, device=self.device),
            "image_size": torch.tensor([[width, height]] * batch, dtype=torch.float32, device=self.device),
            "mask": torch.zeros(batch, n, dtype=torch.bool, device=self.device),
        }
        for i, (kp, sc, desc) in enumerate(zip(pred["keypoints"], pred["keypoint_scores"], pred["descriptors"])):
            out["keypoints"][i, :len(kp)] = kp
            out["keypoint_scores"][i, :len(kp)] = sc
            out["descriptors"][i, :len(kp)] = desc
            out["mask"][i, :len(kp)] = True
        return out


def match(feats0: Mapping, feats1: Mapping, max_distance: float | None = 0.7, ratio: float | None = None,
          mutual: bool = True) -> dict:
    """Nearest-neighbour matches between the outputs of two `extract` calls (same batch size B).

    A point of image 0 matches its nearest neighbour in image 1 (Euclidean descriptor distance) when
    that distance is <= max_distance, it passes the ratio test (nearest <= ratio * second nearest),
    and, with `mutual`, it is also the nearest neighbour's nearest neighbour (the test applied both
    ways). None disables a threshold. The defaults are MagicLeap's and hloc's `NN-superpoint`
    (mutual, distance 0.7); hloc's `NN-ratio` is max_distance=None, ratio=0.8.
    Returns, like LightGlue's matcher:
      'matches0'          (B, N0) long, index into image 1 or -1
      'matching_scores0'  (B, N0) float32, (1 + cosine) / 2 of the match, 0 where unmatched (hloc's score)
      'matches'           B x (K, 2) long index pairs (i0, i1)
      'scores'            B x (K,) float32
    """
    matches0, scores0 = nearest_neighbour_matches(
        feats0["descriptors"], feats1["descriptors"], feats0.get("mask"), feats1.get("mask"),
        max_distance=max_distance, ratio=ratio, mutual=mutual)
    pairs = [torch.nonzero(m >= 0)[:, 0] for m in matches0]
    return {
        "matches0": matches0,
        "matching_scores0": scores0,
        "matches": [torch.stack([i, m[i]], dim=-1) for i, m in zip(pairs, matches0)],
        "scores": [s[i] for i, s in zip(pairs, scores0)],
    }
