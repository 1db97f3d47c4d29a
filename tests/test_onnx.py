"""export.py export_onnx: the ONNX file against PyTorch (dynamic batch and size, both networks, with and
without the heatmap head), the README's ONNX Runtime snippet in a fresh process, and the errors."""
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

import export
import settings
from models import get_model
from models.extractor import SuperPointExtractor
from pipeline import export_onnx
from tests.conftest import REPO
from utils.keypoints import logits_to_heatmap

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def exper(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    return tmp_path / "logs"


def write_config(tmp_path, **model):
    path = tmp_path / "onnx.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "hpatches"}, "model": {"nms": 4, **model}}))
    return path


def run_both(onnx_path, weights, images, heatmap):
    """(ONNX Runtime outputs, PyTorch fp32 outputs) for (B, 1, H, W) images."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.numpy()})
    net = SuperPointExtractor.from_weights(weights, channels_last=False).net
    with torch.inference_mode():
        ref = net(images)
    first = logits_to_heatmap(ref["semi"]) if heatmap else ref["semi"]
    return got, [first.numpy(), ref["desc"].numpy()]


def real_images(hpatches, batch, h, w):
    names = ["v_graffiti/1.ppm", "i_leuven_oxford/2.ppm", "v_graffiti/3.ppm"][:batch]
    grey = [cv2.resize(cv2.imread(str(hpatches / n), 0), (w, h), interpolation=cv2.INTER_AREA) for n in names]
    return torch.from_numpy(np.stack(grey).astype(np.float32) / 255)[:, None]


def test_heatmap_onnx_matches_pytorch_at_any_batch_and_size(exper, tmp_path, magicleap_weights, hpatches):
    config = write_config(tmp_path, name="SuperPointNet_pretrained", pretrained=str(magicleap_weights))
    export.main(["export_onnx", str(config), "onnx", "--heatmap"])
    report = json.loads((exper / "onnx" / "export_onnx.json").read_text())
    assert report["ok"] and report["outputs"] == ["heatmap", "descriptors"]
    assert all(r["max_heatmap_difference"] <= 1e-4 and r["identical_keypoints"] and r["keypoints"] > 50
               for r in report["sizes"])
    # Sizes and a batch the export never saw: the axes are dynamic.
    images = real_images(hpatches, 3, 152, 208)
    got, ref = run_both(exper / "onnx" / "superpoint.onnx", magicleap_weights, images, heatmap=True)
    assert got[0].shape == (3, 152, 208) and got[1].shape == (3, 256, 19, 26)
    assert np.abs(got[0] - ref[0]).max() <= 1e-4 and np.abs(got[1] - ref[1]).max() <= 1e-4
    assert not (exper / "onnx" / "superpoint.onnx.partial").exists()


def test_readme_snippet_runs_in_a_fresh_process(exper, tmp_path, magicleap_weights, hpatches):
    config = write_config(tmp_path, name="SuperPointNet_pretrained", pretrained=str(magicleap_weights))
    export.main(["export_onnx", str(config), "snippet", "--heatmap"])
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    work = tmp_path / "fresh"
    work.mkdir()
    (work / "superpoint.onnx").write_bytes((exper / "snippet" / "superpoint.onnx").read_bytes())
    image = real_images(hpatches, 1, 240, 320)
    cv2.imwrite(str(work / "image.png"), np.round(image[0, 0].numpy() * 255).astype(np.uint8))
    save = "\nnp.savez('out.npz', heatmap=heatmap, descriptors=descriptors, xs=xs, ys=ys)\n"
    done = subprocess.run([sys.executable, "-c", snippet + save], cwd=work, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "candidates; descriptor map (1, 256, 30, 40)" in done.stdout
    out = np.load(work / "out.npz")
    _, ref = run_both(work / "superpoint.onnx", magicleap_weights, image, heatmap=True)
    assert np.abs(out["heatmap"] - ref[0]).max() <= 1e-4
    ys, xs = np.nonzero(ref[0][0] >= 0.015)
    assert len(xs) > 100 and np.array_equal(out["xs"], xs) and np.array_equal(out["ys"], ys)


def test_logits_onnx_of_the_batchnorm_network(exper, tmp_path):
    # The reference's network (BatchNorm, folded at export in eval mode) with random weights and
    # non-trivial running statistics.
    torch.manual_seed(0)
    net = get_model("SuperPointNet_gauss2")
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "gauss2.pth"
    torch.save(net.state_dict(), weights)
    config = write_config(tmp_path, name="SuperPointNet_gauss2", pretrained=str(weights), detection_threshold=0.0)
    export.main(["export_onnx", str(config), "bn"])
    images = torch.rand(2, 1, 64, 96, generator=torch.Generator().manual_seed(1))
    got, ref = run_both(exper / "bn" / "superpoint.onnx", weights, images, heatmap=False)
    assert got[0].shape == (2, 65, 8, 12)
    assert np.abs(got[0] - ref[0]).max() <= 1e-4 and np.abs(got[1] - ref[1]).max() <= 1e-4


def test_export_onnx_errors(exper, tmp_path, magicleap_weights, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["export_onnx", str(write_config(tmp_path, name="SuperPointNet_pretrained")), "none"])
    assert e.value.code == 2 and "no weights" in capsys.readouterr().err
    # A file that fails the validation is not left behind.
    monkeypatch.setattr(export_onnx, "MAX_HEATMAP_DIFFERENCE", -1.0)
    config = write_config(tmp_path, name="SuperPointNet_pretrained", pretrained=str(magicleap_weights))
    with pytest.raises(SystemExit) as e:
        export.main(["export_onnx", str(config), "bad"])
    assert e.value.code == 2 and "disagrees with PyTorch" in capsys.readouterr().err
    assert not list((exper / "bad").glob("superpoint.onnx*"))
    with pytest.raises(SystemExit) as e:
        export.main(["export_onnx", str(config), "bad", "--threads", "0"])
    assert e.value.code == 2
