"""pipeline.training_images: the shipped SuperPoint's training images, laid out as a COCO folder."""
import numpy as np
import pytest

from pipeline import training_images
from utils.images import read_image
from utils.io import save_image


def write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, image)


@pytest.fixture
def shared(tmp_path):
    root = tmp_path / "shared"
    rng = np.random.default_rng(0)
    write(root / "COCO/train2014/a.jpg", rng.integers(0, 255, (480, 640), dtype=np.uint8))
    write(root / "COCO/val2014/b.jpg", rng.integers(0, 255, (400, 300), dtype=np.uint8))
    write(root / "natural/tum/c.png", rng.integers(0, 255, (480, 640), dtype=np.uint8))
    (root / "natural/tum/broken.png").write_bytes(b"not a png")
    # KITTI frames whose columns encode their x coordinate, to see which crop was taken.
    frame = np.tile((np.arange(416) * 255 // 415).astype(np.uint8), (128, 1))
    for i in range(3):
        write(root / f"KITTI/drive_x_sync/image_02/data/{i:010d}.jpg", frame)
    return root


def test_layout_sizes_names_and_kitti_crops(shared, tmp_path):
    out = tmp_path / "data"
    counts = training_images.write_training_images(shared, out, (240, 320))
    train = sorted(p.name for p in (out / "COCO/train2014").iterdir())
    names = {"coco_a.png", "natural_tum_c.png"} | {f"kitti_drive_x_sync_{i:010d}.png" for i in range(3)}
    assert names <= set(train)
    assert not any("broken" in n for n in train)  # unreadable: reported and skipped
    assert all(n.startswith("builtin_") for n in set(train) - names)  # scikit-image's training photographs
    assert counts == {"train": len(train), "val": 1}
    assert (out / "COCO/val2014/coco_b.png").is_file()
    for path in (out / "COCO").rglob("*.png"):
        assert read_image(path).shape == (240, 320)
    # A 128 x 416 frame holds three 128 x 171 crops at 3:4: left, centre, right for frames 0, 1, 2.
    means = [read_image(out / f"COCO/train2014/kitti_drive_x_sync_{i:010d}.png").mean() for i in range(3)]
    expected = [np.mean(np.arange(left, left + 171) * 255 / 415) for left in (0, (416 - 171) // 2, 416 - 171)]
    assert means == pytest.approx(expected, abs=3)
