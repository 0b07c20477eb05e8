import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.bad_inputs import check_exif_orientation, exif_rotated_jpeg, png_declaring
from tests.conftest import write_image
from wbc_tasks.data.images import DISAPPEARED, ImageError, inspect_image, load_image

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
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
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


@pytest.mark.parametrize(
    "width,height", [(100_000, 100_000), (5_000, 4_000)], ids=["beyond-pillow-limit", "beyond-our-limit"]
)
def test_declared_huge_dimensions_rejected_from_the_header(tmp_path, monkeypatch, width, height):
    # A 60-byte PNG declaring 10^10 (Pillow's own bomb error) or 2x10^7 pixels (our limit only).
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(width, height))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for check in (lambda: load_image(path, 32, max_pixels=LIMIT), lambda: inspect_image(path, max_pixels=LIMIT)):
        with pytest.raises(ImageError, match="too large") as info:
            check()
        assert info.value.path == str(path)


def test_declared_huge_dimensions_cost_no_memory(tmp_path):
    # In a fresh process, so the peak resident size measures this one call.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))
    code = (
        "import resource, sys\n"
        "from wbc_tasks.data.images import ImageError, load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_image({str(path)!r}, 32, max_pixels=40_000_000)\n"
        "except ImageError as exc:\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, exc.reason)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    grown_kib, reason = done.stdout.split(" ", 1)
    assert "too large" in reason, done.stderr
    assert int(grown_kib) < 20 * 1024  # a decode would need 30 GB


def test_exif_orientation_moves_the_corner(tmp_path):
    # Stored 64x32 with a red top-left block, EXIF orientation 6: shown 32x64, red at top right.
    exif_rotated_jpeg(tmp_path / "r.jpg")
    check_exif_orientation(load_image(tmp_path / "r.jpg", 32, max_pixels=LIMIT))
    # The check can fail: the same picture without the EXIF tag is not accepted by it.
    with Image.open(tmp_path / "r.jpg") as img:
        img.save(tmp_path / "plain.jpg", quality=95)
    with pytest.raises(AssertionError):
        check_exif_orientation(load_image(tmp_path / "plain.jpg", 32, max_pixels=LIMIT))


def test_tiny_image_used_when_the_minimum_allows(tmp_path):
    write_image(tmp_path / "s.png", size=(8, 8))
    assert load_image(tmp_path / "s.png", 32, max_pixels=LIMIT, min_side=8).shape == (32, 32, 3)


def test_vanished_file_rejected_with_its_own_reason(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "gone.png", 32, max_pixels=LIMIT)
    assert info.value.reason == DISAPPEARED
    (tmp_path / "loop.png").symlink_to("loop.png")
    with pytest.raises(ImageError, match="symlink loop"):
        inspect_image(tmp_path / "loop.png", max_pixels=LIMIT)
    (tmp_path / "broken.png").symlink_to("gone.png")
    with pytest.raises(ImageError, match="broken symlink"):
        inspect_image(tmp_path / "broken.png", max_pixels=LIMIT)
