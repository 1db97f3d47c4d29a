"""torch.hub entry point: `torch.hub.load(<path to this repository>, 'superpoint', source='local', weights=...)`.

Returns a `models.extractor.SuperPointExtractor`: `extractor.extract(image)` gives LightGlue-style
keypoints, scores and descriptors, and `models.extractor.match` matches two such outputs. The project
ships no third-party weights, so `weights` is a file on disk (MagicLeap's `superpoint_v1.pth` or a
checkpoint of this project); without it the network has random weights.
"""
dependencies = ["torch", "numpy", "cv2", "yaml"]


def superpoint(weights=None, device="cpu", **conf):
    """SuperPoint extractor. weights: a weights file (the network is picked from its layout; MagicLeap's
    weights default to `descriptor_sampling: superglue`, see `SuperPointExtractor.from_weights`), or None
    for random weights. conf: other `model` keys (detection_threshold, nms, top_k, descriptor_sampling,
    precision, ...)."""
    from models.extractor import SuperPointExtractor

    if weights is None:
        return SuperPointExtractor({"name": "SuperPointNet_pretrained", **conf}, device=device)
    return SuperPointExtractor.from_weights(weights, device=device, **conf)
