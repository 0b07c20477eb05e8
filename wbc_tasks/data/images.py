"""The one image loader, shared by training and inference.

Decode, apply EXIF orientation, bring any mode (grayscale, RGBA, palette, CMYK, 16-bit) to
8-bit RGB, and resize to a square of the model's side. Pixels stay uint8 0..255: VGG16's own
normalisation lives inside the Keras model, so training and serving cannot disagree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wbc_tasks.core.paths import is_inside

#: Alpha is composited onto white: slide background is light, black would look like a stain.
_ALPHA_BACKGROUND = (255, 255, 255)

#: The reason recorded for a file that was listed but gone (moved, renamed, deleted) when read.
#: The nightly run records such files without a content hash, so they are classified on a later
#: night if they come back.
DISAPPEARED = "file disappeared before it could be read (moved, renamed or deleted)"


class ImageError(ValueError):
    """An image that cannot be used, with the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What validation learns about a file without keeping its pixels."""

    sha256: str
    width: int
    height: int
    mode: str
    format: str


def resolve_within(path: Path, roots: Sequence[Path]) -> Path:
    """Where ``path`` really is (links followed), if it may be read: it must lie under one of
    ``roots`` (resolved folders) and exist. Else :class:`ImageError` saying which of a symlink
    loop, a link out of ``roots``, a broken link or a vanished file it is."""
    try:
        target = path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a loop
        raise ImageError(path, "symlink loop (the link leads back to itself)") from exc
    if not is_inside(target, roots):
        allowed = ", ".join(str(r) for r in roots) or "(none)"
        what = "symlink points" if os.path.islink(path) else "file lies"
        raise ImageError(path, f"{what} outside the allowed folders ({target} not under {allowed})")
    try:
        os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return target


def _unreadable(path: Path, exc: OSError) -> ImageError:
    """Why ``os.stat(path)`` failed, in words."""
    if exc.errno == errno.ELOOP:  # newer Pythons resolve a loop without raising
        return ImageError(path, "symlink loop (the link leads back to itself)")
    if os.path.islink(path):
        return ImageError(path, f"broken symlink (target {os.path.realpath(path)} is missing)")
    if not os.path.lexists(path):
        return ImageError(path, DISAPPEARED)
    return ImageError(path, f"cannot read file: {exc.strerror or exc}")


def sha256_of_file(path: Path, block: int = 1 << 20) -> str:
    """Content hash: the identity of an image across runs, folders and drops."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _open_checked(path: Path, max_pixels: int, min_side: int) -> Image.Image:
    try:
        stat = path.stat()
    except OSError as exc:
        # A file listed a moment ago may be gone (a drop folder renamed mid-run), or be a broken
        # link or a loop: say which, as a rejection (the caller's batch goes on).
        raise _unreadable(path, exc) from exc
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if stat.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        # Pillow's own bomb check warns below 2x its limit; we want a hard, configurable limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"image too large to decode safely ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageError(path, DISAPPEARED) from exc
    except OSError as exc:
        raise ImageError(path, f"cannot open image: {exc}") from exc
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageError(path, f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
    if min(width, height) < min_side:
        img.close()
        raise ImageError(path, f"image too small: {width}x{height}, minimum side is {min_side}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        lo, hi = float(array.min(initial=0)), float(array.max(initial=1))
        scaled = (array - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: Path | str, size: int, *, max_pixels: int, min_side: int = 1) -> np.ndarray:
    """Decode ``path`` into a ``(size, size, 3)`` uint8 RGB array, or raise :class:`ImageError`."""
    path = Path(path)
    img = _open_checked(path, max_pixels, min_side)
    try:
        with img:
            if img.format == "JPEG":
                # DCT-domain downscaling: decoding a 360 px JPEG for a 64 px model costs far less.
                img.draft("RGB", (size, size))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            array = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(path, f"corrupt or truncated image: {exc}") from exc
    if array.shape != (size, size, 3):
        raise ImageError(path, f"unexpected decoded shape {array.shape}")
    return array


def inspect_image(path: Path | str, *, max_pixels: int, min_side: int = 1) -> ImageInfo:
    """Hash and fully decode ``path`` (catching truncation), keeping only its description."""
    path = Path(path)
    img = _open_checked(path, max_pixels, min_side)
    try:
        with img:
            fmt = img.format or "unknown"
            mode = img.mode
            width, height = img.size
            img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(path, f"corrupt or truncated image: {exc}") from exc
    try:
        digest = sha256_of_file(path)
    except FileNotFoundError as exc:  # gone since it was decoded: must not crash the split
        raise ImageError(path, DISAPPEARED) from exc
    except OSError as exc:
        raise ImageError(path, f"cannot read file: {exc.strerror or exc}") from exc
    return ImageInfo(sha256=digest, width=width, height=height, mode=mode, format=fmt)


def thumbnail_jpeg(path: Path | str, side: int, *, max_pixels: int, quality: int = 90) -> bytes:
    """A JPEG of the image at ``path`` fitting in ``side`` x ``side`` (never enlarged), decoded with
    the same checks and orientation/colour handling as :func:`load_image`; the file is only read."""
    import io

    with _open_checked(Path(path), max_pixels, 1) as img:
        try:
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        except OSError as exc:
            raise ImageError(path, f"cannot decode image: {exc}") from exc
    rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()
