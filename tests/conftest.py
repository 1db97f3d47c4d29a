"""Shared fixtures: the real data in ../shared/data (skipped with a reason where absent), devices."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MAGICLEAP_WEIGHTS = SHARED_DATA / "pretrained" / "superpoint_v1.pth"
REFERENCE_PREDICTIONS = SHARED_DATA / "reference_predictions" / "superpoint_coco_heat2_0_170k_nms4_det0.015"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real data beside the checkout); not present here")
    return path


@pytest.fixture
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture
def magicleap_weights() -> Path:
    return _need(MAGICLEAP_WEIGHTS)


@pytest.fixture
def reference_predictions() -> Path:
    return _need(REFERENCE_PREDICTIONS)


@pytest.fixture
def hpatches(shared_data) -> Path:
    return _need(shared_data / "HPatches")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny convolutions gain nothing from threads, and on a shared
    CPU spinning threads cost a lot. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def random_weights(tmp_path) -> Path:
    """A randomly initialised SuperPointNet_pretrained state_dict file (MagicLeap's layout), seed 0."""
    from models.SuperPointNet_pretrained import SuperPointNet_pretrained

    torch.manual_seed(0)
    path = tmp_path / "random_superpoint.pth"
    torch.save(SuperPointNet_pretrained().state_dict(), path)
    return path
