"""torch.hub entry point: `torch.hub.load(<path to this repository>, 'superpoint', source='local', weights=...)`.

Returns a `models.extractor.SuperPointExtractor`: `extractor.extract(image)` gives LightGlue-style
keypoints, scores and descriptors, and `models.extractor.match` matches two such outputs. Without
`weights`, the project's own SuperPoint (pretrained/superpoint_mix.pth); `weights` may be any weights
file on disk (MagicLeap's `superpoint_v1.pth`, a checkpoint of this project), or 'random' for an
untrained network.
"""
dependencies = ["torch", "numpy", "cv2", "yaml"]


def superpoint(weights=None, device="cpu", **conf):
    """SuperPoint extractor. weights: a weights file (the network is picked from its layout; MagicLeap's
    weights default to `descriptor_sampling: superglue`, see `SuperPointExtractor.from_weights`), None for
    the project's shipped SuperPoint, or 'random' for random weights. conf: other `model` keys
    (detection_threshold, nms, top_k, descriptor_sampling, precision, ...)."""
    from models.extractor import SuperPointExtractor

    if weights == "random":
        return SuperPointExtractor({"name": "SuperPointNet_gauss2", **conf}, device=device)
    return SuperPointExtractor.from_weights(weights, device=device, **conf)
