"""The table of awkward input files (issue 7), shared by the training-split and nightly tests.

Each :class:`Case` writes one entry (a file, a link, a nested file) into a folder: a class
folder for the training split, a drop folder for the nightly run. ``reason`` is None when the
file must be used, else a regular expression the recorded rejection reason must match.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Side of the generated images: above the default minimum side (32), small enough to be fast.
SIDE = 40
#: The EXIF case: stored 64 wide x 32 high, a red block in the stored top-left corner.
EXIF_STORED = (64, 32)


def _random(seed: int, size=(SIDE + 8, SIDE), channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def png_declaring(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares ``width`` x ``height`` RGB pixels (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def rgb16_png(seed: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 65536, size=(SIDE, SIDE, 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", SIDE, SIDE, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 64x32 with a red top-left block; EXIF orientation 6 (display rotated 90° CW)."""
    width, height = EXIF_STORED
    array = np.full((height, width, 3), 40, dtype=np.uint8)  # dark grey
    array[: height // 2, : width // 4] = (255, 0, 0)  # red: stored top-left corner
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    _save(path, image, format="JPEG", exif=exif, quality=95)


def check_exif_orientation(array: np.ndarray) -> None:
    """``array`` (a square decode of :func:`exif_rotated_jpeg`) shows the rotated display.

    Rotated 90° CW the picture is 32 wide x 64 high and the red block sits in the top-right
    corner, covering the right half of the width and the top quarter of the height. Unrotated
    it would be the left quarter x top half; rotated the wrong way, bottom-left.
    """
    side = array.shape[0]
    red = (array[..., 0] > 150) & (array[..., 1] < 100) & (array[..., 2] < 100)
    q, h = side // 4, side // 2
    assert red[1 : q - 1, h + 1 : -1].all(), "red corner is not at the top right"
    assert not red[q + 1 :, :].any(), "red below the top quarter: orientation not applied"
    assert not red[:, : h - 1].any(), "red in the left half: orientation not applied"


def _bytes(data: bytes | Callable[[int], bytes]) -> Callable[[Path, Path, int], None]:
    def make(path: Path, scratch: Path, seed: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data(seed) if callable(data) else data)

    return make


def _image(mode: str, fmt: str, size=(SIDE + 8, SIDE)) -> Callable[[Path, Path, int], None]:
    def make(path: Path, scratch: Path, seed: int) -> None:
        base = Image.fromarray(_random(seed, size))
        if mode == "RGBA":
            rgba = _random(seed, size, 4)
            rgba[: size[1] // 2, :, 3] = 0  # top half fully transparent
            image = Image.fromarray(rgba, "RGBA")
        elif mode == "I;16":
            image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
            assert image.mode == "I;16"
        else:
            image = base.convert(mode)
        _save(path, image, format=fmt)

    return make


def _truncated_jpeg(path: Path, scratch: Path, seed: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_random(seed, (200, 200))).save(buffer, format="JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _tiff16_rgb(path: Path, scratch: Path, seed: int) -> None:
    import tifffile  # scikit-image's dependency; Pillow cannot write it

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, rng.integers(0, 65536, (SIDE, SIDE, 3), dtype=np.uint16), photometric="rgb")


def _link_to(where: str) -> Callable[[Path, Path, int], None]:
    """A symlink to a fresh image under ``scratch/<where>`` (``share`` is the allowed root)."""

    def make(path: Path, scratch: Path, seed: int) -> None:
        target = scratch / where / f"target-{seed}.png"
        _save(target, Image.fromarray(_random(seed)), format="PNG")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)

    return make


def _folder_link_to(where: str) -> Callable[[Path, Path, int], None]:
    """``path.parent`` becomes a link to a fresh folder under ``scratch/<where>`` holding ``path``'s
    name as an image (a lab share mounted into the tree)."""

    def make(path: Path, scratch: Path, seed: int) -> None:
        folder = scratch / where / f"folder-{seed}"
        _save(folder / path.name, Image.fromarray(_random(seed)), format="PNG")
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        path.parent.symlink_to(folder, target_is_directory=True)

    return make


def _broken_link(path: Path, scratch: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.with_name("never-there.png"))  # inside the folder, so not "outside"


def _file_loop(path: Path, scratch: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.name)  # loop.png -> loop.png


def _folder_loop(path: Path, scratch: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path.parent / "inside-loop.png", Image.fromarray(_random(seed)), format="PNG")
    path.symlink_to("..", target_is_directory=True)  # looped/back -> looped/..


@dataclass(frozen=True)
class Case:
    id: str
    #: Where the entry goes, relative to the class or drop folder.
    name: str
    make: Callable[[Path, Path, int], None]
    #: None: used. Else a regex the rejection reason must match.
    reason: str | None
    #: Extra files the case writes beside ``name`` that must be used (the folder-loop case).
    also_used: tuple[str, ...] = ()
    #: Run with this ``min_image_side`` setting instead of the default (32).
    min_side: int | None = None


CASES: tuple[Case, ...] = (
    Case("zero_byte", "zero.jpg", _bytes(b""), r"empty file \(0 bytes\)"),
    Case("truncated_jpeg", "truncated.jpg", _truncated_jpeg, r"corrupt or truncated image"),
    Case("text_named_jpg", "notes.jpg", _bytes(b"slide 14 re-stained\n" * 20), r"not a readable image"),
    Case("png_alpha", "alpha.png", _image("RGBA", "PNG"), None),
    Case("png_16bit_gray", "gray16.png", _image("I;16", "PNG"), None),
    Case("png_16bit_rgb", "rgb16.png", _bytes(rgb16_png), None),
    Case("tiff_16bit_gray", "gray16.tif", _image("I;16", "TIFF"), None),
    Case("tiff_16bit_rgb", "rgb16.tiff", _tiff16_rgb, None),
    Case("grayscale", "gray.jpg", _image("L", "JPEG"), None),
    Case("cmyk_jpeg", "cmyk.jpg", _image("CMYK", "JPEG"), None),
    Case("exif_rotated", "rotated.jpg", lambda p, s, seed: exif_rotated_jpeg(p), None),
    Case(
        "decompression_bomb",
        "bomb.png",
        _bytes(png_declaring(100_000, 100_000)),
        r"too large to decode safely|image too large",
    ),
    Case("tiny_8x8", "tiny.png", _image("RGB", "PNG", size=(8, 8)), r"image too small: 8x8, minimum side is 32"),
    Case("tiny_8x8_min_side_8", "tiny-allowed.png", _image("RGB", "PNG", size=(8, 8)), None, min_side=8),
    Case("spaces_non_ascii_name", "cell 01 ü é 細胞.png", _image("RGB", "PNG"), None),
    Case("nested_folder", "sub/deeper/nested.png", _image("RGB", "PNG"), None),
    Case("symlink_into_allowed_root", "linked.png", _link_to("share"), None),
    Case(
        "symlink_outside_allowed_roots",
        "outside.png",
        _link_to("elsewhere"),
        r"symlink points outside the allowed folders",
    ),
    Case("symlinked_folder_into_allowed_root", "linked-folder/cell.png", _folder_link_to("share"), None),
    # The rejection is recorded for the folder link itself: its files are never listed.
    Case(
        "symlinked_folder_outside_allowed_roots",
        "outlinked-folder",
        lambda p, s, seed: _folder_link_to("elsewhere")(p / "cell.png", s, seed),
        r"symlink points outside the allowed folders",
    ),
    Case("broken_symlink", "broken.png", _broken_link, r"broken symlink"),
    Case("symlink_loop_file", "loop.png", _file_loop, r"symlink loop"),
    Case("symlink_loop_folder", "looped/back", _folder_loop, r"symlink loop", also_used=("looped/inside-loop.png",)),
)


def build_cases(folder: Path, scratch: Path, cases=CASES) -> None:
    """Write every case into ``folder``; link targets go under ``scratch`` (share/, elsewhere/).

    Each case has its own seed (its place in :data:`CASES`), so no two cases are the same image.
    """
    ids = [c.id for c in CASES]
    for case in cases:
        case.make(folder / case.name, scratch, 100 + ids.index(case.id))


def snapshot(*folders: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``folders``, links included: (size, mtime_ns, sha256 or link target).

    Compared before and after a run, it proves no input file was modified, moved or touched.
    """
    state = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            key = str(path)
            if path.is_symlink():
                state[key] = (0, path.lstat().st_mtime_ns, "-> " + str(path.readlink()))
            elif path.is_file():
                stat = path.stat()
                state[key] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            elif path.is_dir():
                state[key] = (0, path.stat().st_mtime_ns, "dir")
    return state
