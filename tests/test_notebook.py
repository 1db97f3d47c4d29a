"""notebooks/visualize_hpatches.ipynb runs (its code cells exec'd in order, as Jupyter would) and writes
the figures it promises, from a given predictions folder and from its own MagicLeap export."""
import json
import tempfile
from pathlib import Path

import cv2
import yaml

import export
import settings

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "visualize_hpatches.ipynb"


def run_notebook(monkeypatch, **env) -> dict:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    # The notebook may set these module globals for its own export; restore them afterwards.
    monkeypatch.setattr(settings, "DATA_PATH", settings.DATA_PATH)
    monkeypatch.setattr(settings, "EXPER_PATH", settings.EXPER_PATH)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace = {"__name__": "__notebook__"}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell", "exec"), namespace)
    return namespace


def assert_figures(figures: Path, n_pairs: int):
    promised = [f"{kind}_{i}.png" for kind in ("keypoints", "matches", "repeatability") for i in range(n_pairs)]
    for name in promised + ["repeatability_summary.png"]:
        image = cv2.imread(str(figures / name))
        assert image is not None and image.shape[0] > 50 and image.shape[1] > 100, name


def test_notebook_on_a_predictions_folder(tmp_path, monkeypatch, hpatches, magicleap_weights):
    conf = yaml.safe_load(Path("configs/magicleap_hpatches_export.yaml").read_text())
    conf["model"]["pretrained"] = str(magicleap_weights)
    conf["data"]["truncate"] = 2
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(conf))
    monkeypatch.setattr(settings, "DATA_PATH", str(hpatches.parent))
    monkeypatch.setattr(settings, "EXPER_PATH", str(tmp_path / "logs"))
    export.main(["export_descriptor", str(tmp_path / "export.yaml"), "ml"])
    predictions = tmp_path / "logs" / "ml" / "predictions"

    ns = run_notebook(monkeypatch, PREDICTIONS_DIR=predictions, FIGURES_DIR=tmp_path / "figures", NUM_PAIRS=2)
    assert_figures(tmp_path / "figures", 2)
    assert ns["names"][:2] == ["i_leuven_oxford/1_2", "i_leuven_oxford/1_3"]
    # Illumination pairs of MagicLeap's weights: most points repeat, the estimate is near the truth.
    assert all(0.4 < r.repeatability <= 1 for r in ns["all_results"])
    assert ns["error"] < 5


def test_notebook_exports_when_no_folder_is_given(tmp_path, monkeypatch, shared_data, magicleap_weights, hpatches):
    monkeypatch.delenv("PREDICTIONS_DIR", raising=False)
    monkeypatch.delenv("FIGURES_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's temporary export goes here
    ns = run_notebook(monkeypatch, HPATCHES_TRUNCATE=1, NUM_PAIRS=1)
    assert len(ns["files"]) == 1
    assert ns["FIGURES_DIR"] == ns["PREDICTIONS_DIR"] / "notebook_figures"
    assert_figures(ns["FIGURES_DIR"], 1)
    assert set(ns["FIGURES"]) >= {ns["FIGURES_DIR"] / "keypoints_0.png", ns["FIGURES_DIR"] / "homography_0.png"}
