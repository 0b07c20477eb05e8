import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_image
from wbc_tasks.images import ImageError, inspect_image, load_image

LIMIT = 10_000_000


def test_real_jpeg_resized_to_uint8_square(seed_shaped):
    path = next((seed_shaped / "blasts").iterdir())
    array = load_image(path, 64, max_pixels=LIMIT)
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8
    assert 20 < array.mean() < 250  # real content, not a blank


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
        assert img.mode.startswith("I")
        name = "x.png"
    elif mode == "CMYK":
        img, name = base.convert("CMYK"), "x.jpg"
    else:
        img, name = base.convert(mode), "x.png"
    path = tmp_path / name
    img.save(path)
    array = load_image(path, 32, max_pixels=LIMIT)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    # A mid-grey 16-bit image must stay mid-grey, not saturate to white.
    img = Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16))
    img.save(tmp_path / "g16.png")
    array = load_image(tmp_path / "g16.png", 32, max_pixels=LIMIT)
    assert 120 <= array.mean() <= 136


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", 32, max_pixels=LIMIT).min() == 255


def test_exif_orientation_applied(tmp_path):
    # Left half dark, right half light; EXIF says rotate 90 degrees.
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 40:] = 255
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg", 32, max_pixels=LIMIT)
    # After rotation the light half is at the bottom, so rows differ, not columns.
    assert out[24:, :, :].mean() > 200 and out[:8, :, :].mean() < 60


def test_empty_file_rejected(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as info:
        load_image(tmp_path / "e.jpg", 32, max_pixels=LIMIT)
    assert info.value.path.endswith("e.jpg")


def test_text_named_jpg_rejected(tmp_path):
    (tmp_path / "t.jpg").write_text("not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        inspect_image(tmp_path / "t.jpg", max_pixels=LIMIT)


def test_truncated_jpeg_rejected(tmp_path):
    full = write_image(tmp_path / "full.jpg", size=(200, 200), seed=3)
    data = full.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        inspect_image(tmp_path / "cut.jpg", max_pixels=LIMIT)
    with pytest.raises(ImageError):
        load_image(tmp_path / "cut.jpg", 32, max_pixels=LIMIT)


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    # A tiny PNG file declaring 20000x20000 pixels.
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    (tmp_path / "bomb.png").write_bytes(buffer.getvalue())
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "bomb.png", 32, max_pixels=LIMIT)


def test_tiny_image_rejected(tmp_path):
    write_image(tmp_path / "s.png", size=(8, 8))
    with pytest.raises(ImageError, match="too small"):
        load_image(tmp_path / "s.png", 32, max_pixels=LIMIT, min_side=16)


def test_inspect_reports_hash_and_size(tmp_path):
    path = write_image(tmp_path / "i.png", size=(50, 30))
    info = inspect_image(path, max_pixels=LIMIT)
    assert (info.width, info.height, info.format) == (50, 30, "PNG")
    assert len(info.sha256) == 64
