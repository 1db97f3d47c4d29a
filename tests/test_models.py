"""Networks and the extractor: architecture, checkpoint compatibility, weight loading, real detections."""
import cv2
import numpy as np
import pytest
import torch

from models import get_model
from models.extractor import SuperPointExtractor
from utils.checkpoints import load_weights_into, save_checkpoint, save_weights
from utils.io import DataError

# state_dict layout of the reference's checkpoints (its parameter names and shapes, so they load unchanged).
REFERENCE_BLOCKS = ["inc.conv.conv"] + [f"down{i}.mpconv.1.conv" for i in (1, 2, 3)]
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def reference_gauss2_keys():
    keys = set()
    for block in REFERENCE_BLOCKS:
        for conv, bn in ((0, 1), (3, 4)):
            keys |= {f"{block}.{conv}.weight", f"{block}.{conv}.bias"}
            keys |= {f"{block}.{bn}.{k}" for k in BN_KEYS}
    for conv, bn in (("convPa", "bnPa"), ("convPb", "bnPb"), ("convDa", "bnDa"), ("convDb", "bnDb")):
        keys |= {f"{conv}.weight", f"{conv}.bias"} | {f"{bn}.{k}" for k in BN_KEYS}
    return keys


def test_gauss2_matches_reference_architecture():
    net = get_model("SuperPointNet_gauss2")
    assert set(net.state_dict()) == reference_gauss2_keys()
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 1_304_067
    out = net.eval()(torch.rand(2, 1, 48, 64))
    assert out["semi"].shape == (2, 65, 6, 8) and out["desc"].shape == (2, 256, 6, 8)
    assert torch.allclose(out["desc"].norm(dim=1), torch.ones(2, 6, 8), atol=1e-5)


def test_dustbin_prior_starts_the_detector_at_the_no_corner_loss():
    torch.manual_seed(0)
    plain = get_model("SuperPointNet_gauss2")
    torch.manual_seed(0)
    prior = get_model("SuperPointNet_gauss2", {"dustbin_prior": 6.0})
    assert set(prior.state_dict()) == set(plain.state_dict())
    expected_bias = torch.zeros(65)
    expected_bias[64] = 6.0
    assert torch.equal(prior.bnPb.bias.detach(), expected_bias)
    # In training mode BatchNorm standardises the logits, so the prior alone sets the class balance:
    # on an image without corners the cross-entropy falls from about log(65) to about
    # -log(e^6 / (e^6 + 64)) = 0.15 (plus the spread of the standardised logits).
    image = torch.rand(2, 1, 64, 64)
    no_corner = torch.full((2, 8, 8), 64)
    loss_plain = torch.nn.functional.cross_entropy(plain.train()(image)["semi"], no_corner).item()
    loss_prior = torch.nn.functional.cross_entropy(prior.train()(image)["semi"], no_corner).item()
    assert loss_plain > 3.5 and loss_prior < 1.0


def test_pretrained_layout_matches_magicleap(magicleap_weights):
    net = get_model("SuperPointNet_pretrained")
    assert sum(p.numel() for p in net.parameters()) == 1_300_865
    state = torch.load(magicleap_weights, weights_only=True)
    assert set(state) == set(net.state_dict())
    load_weights_into(net, magicleap_weights)
    assert torch.equal(net.convDb.bias, state["convDb.bias"])


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model.name is 'SuperPointNet_gauss3'"):
        get_model("SuperPointNet_gauss3")


def test_reference_checkpoint_round_trip_with_module_prefix(tmp_path):
    net = get_model("SuperPointNet_gauss2")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path, 1234, net, opt, loss=torch.tensor(0.5))
    assert path.name == "superPointNet_1234_checkpoint.pth.tar"
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"n_iter", "model_state_dict", "optimizer_state_dict", "loss"} and raw["n_iter"] == 1234
    # A DataParallel-style checkpoint (module. prefix) loads too.
    raw["model_state_dict"] = {f"module.{k}": v for k, v in raw["model_state_dict"].items()}
    torch.save(raw, tmp_path / "dp.pth.tar")
    other = get_model("SuperPointNet_gauss2")
    load_weights_into(other, tmp_path / "dp.pth.tar")
    for k, v in net.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


def test_save_weights_keeps_the_network_only_in_fp32(tmp_path):
    net = get_model("SuperPointNet_gauss2")
    torch.nn.init.normal_(net.inc.conv.conv[0].weight)  # weights that differ from a fresh network's
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ckpt = save_checkpoint(tmp_path, 7, net.to(torch.bfloat16), opt)
    out = save_weights(ckpt, tmp_path / "pretrained" / "net.pth")
    state = torch.load(out, weights_only=True)
    assert set(state) == set(net.state_dict())  # a plain state_dict: no optimizer, no iteration
    assert all(v.dtype != torch.bfloat16 for v in state.values())
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v.float() if v.is_floating_point() else v), k
    other = get_model("SuperPointNet_gauss2")
    load_weights_into(other, out)
    assert torch.equal(other.inc.conv.conv[0].weight, net.inc.conv.conv[0].weight.float())


def test_bad_weights_give_clear_errors(tmp_path, magicleap_weights):
    with pytest.raises(DataError, match="look like MagicLeap weights"):
        load_weights_into(get_model("SuperPointNet_gauss2"), magicleap_weights)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match="corrupt.pth: not a readable PyTorch weights file"):
        load_weights_into(get_model("SuperPointNet_gauss2"), corrupt)
    with pytest.raises(DataError, match="weights file not found"):
        load_weights_into(get_model("SuperPointNet_gauss2"), tmp_path / "missing.pth")


def test_any_image_size_gives_the_cells_the_pooling_keeps():
    # Three 2x2 poolings floor each side: 100 x 60 has 12 x 7 whole cells, a 96 x 56 heatmap.
    extractor = SuperPointExtractor()
    out = extractor(torch.rand(1, 1, 100, 60))
    assert out["heatmap"].shape == (1, 96, 56) and out["dense_descriptors"].shape == (1, 256, 12, 7)
    with pytest.raises(ValueError, match="at least 8"):
        extractor(torch.rand(1, 1, 7, 60))


def test_extractor_is_always_in_eval_mode():
    extractor = SuperPointExtractor()
    extractor.train()
    assert not extractor.net.training
    x = torch.rand(1, 1, 32, 32)
    # Eval-mode BatchNorm: the output of an image does not depend on the rest of the batch.
    alone = extractor.run_network(x)["semi"]
    batched = extractor.run_network(torch.cat([x, torch.rand(3, 1, 32, 32)]))["semi"][:1]
    assert torch.allclose(alone, batched, atol=1e-4)


def checkerboard(square=40, shape=(240, 320), offset=(20, 20)):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    board = (((xs - offset[0]) // square + (ys - offset[1]) // square) % 2).astype(np.float32)
    return cv2.GaussianBlur(board * 0.8 + 0.1, (5, 5), 1.0)


def test_magicleap_weights_detect_checkerboard_corners(magicleap_weights):
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained", "pretrained": str(magicleap_weights),
                                     "subpixel": {"enable": True}})
    image = checkerboard()
    out = extractor(torch.from_numpy(image)[None, None])
    kp = out["keypoints"][0].numpy()
    # Grid corners sit at x = 20 + 40 i - 0.5, y = 20 + 40 j - 0.5 (between the pixels of two squares).
    corners = np.array([(20 + 40 * i - 0.5, 20 + 40 * j - 0.5) for i in range(0, 8) for j in range(0, 6)])
    dist = np.linalg.norm(kp[:, None] - corners[None], axis=-1)
    assert (dist.min(0) <= 2).mean() > 0.9  # nearly every corner is found
    assert (dist.min(1) <= 2).mean() > 0.8  # and most detections are corners


def test_magicleap_detections_have_high_corner_response(magicleap_weights, hpatches):
    gray = cv2.imread(str(hpatches / "v_graffiti" / "1.ppm"), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(gray, (320, 240), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    extractor = SuperPointExtractor({"name": "SuperPointNet_pretrained", "pretrained": str(magicleap_weights)})
    out = extractor(torch.from_numpy(image)[None, None])
    kp = out["keypoints"][0].numpy().astype(int)
    assert 100 < len(kp) < 2000
    response = cv2.cornerMinEigenVal(image, 5)
    rng = np.random.default_rng(0)
    random_pts = rng.integers([4, 4], [316, 236], size=(2000, 2))
    assert response[kp[:, 1], kp[:, 0]].mean() > 3 * response[random_pts[:, 1], random_pts[:, 0]].mean()
    assert torch.all(out["keypoint_scores"][0][:-1] >= out["keypoint_scores"][0][1:])
    d = out["descriptors"][0]
    assert d.shape == (len(kp), 256) and torch.allclose(d.norm(dim=1), torch.ones(len(kp)), atol=1e-5)
