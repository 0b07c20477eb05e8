"""Per-image augmentation: geometric transforms (flips, right-angle turns, a small affine warp
with reflected borders) and stain colour jitter in HED optical-density space, each drawn from a
generator the caller owns. ``augment`` applies them to whole stores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.color import hed_from_rgb, rgb_from_hed

#: skimage's stain units: optical density divided by -ln(1e-6) (see ``skimage.color.rgb2hed``).
#: Keeping them means the jitter ranges compare with published HED-jitter settings.
_LOG_ADJUST = -math.log(1e-6)
#: Optical density (natural log) of each 8-bit level, read as ``(v + 1) / 256``.
_OD_TABLE = (-np.log((np.arange(256) + 1.0) / 256.0)).astype(np.float32)


@dataclass(frozen=True)
class AugmentParams:
    """Ranges the random transforms are drawn from (uniformly).

    Cells have no up or down, so rotation covers the full circle. The stain jitter is Tellez et
    al.'s (2018, 2019): per H, E and D channel a scale in ``1 +- hed_scale`` and a shift in
    ``+- hed_shift`` (skimage's stain units), which changes hue and stain strength the way labs
    and scanners differ, not just brightness. Their "HED-light" shift of 0.05 turned whole
    slides green, yellow or black on these smears; 0.015 with a scale of 0.1 (between their light
    and strong settings) gave plausible stain variation on the seed set.
    """

    rotation_degrees: float = 180.0
    flip_probability: float = 0.5
    shift_fraction: float = 0.1
    shear_degrees: float = 10.0
    zoom_fraction: float = 0.1
    hed_scale: float = 0.1
    hed_shift: float = 0.015


DEFAULT_PARAMS = AugmentParams()


# --- single images -----------------------------------------------------------------------------


def stain_matrix(
    alpha: Sequence[float] | np.ndarray, beta: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The HED jitter as one affine map on optical density: ``od' = od @ M + b``.

    ``stains = od @ hed_from_rgb`` (skimage's colour deconvolution, Ruifrok & Johnston), then
    ``stains * alpha + beta``, then back with ``rgb_from_hed``. All three steps are affine in
    optical density, so they fold into one 3x3 matrix and an offset. ``od`` is the natural-log
    optical density; ``beta`` is in skimage's stain units (``od / -ln(1e-6)``).
    """
    alpha_ = np.asarray(alpha, dtype=np.float64)
    beta_ = np.asarray(beta, dtype=np.float64)
    matrix = hed_from_rgb @ np.diag(alpha_) @ rgb_from_hed
    offset = (beta_ @ rgb_from_hed) * _LOG_ADJUST
    return matrix.astype(np.float32), offset.astype(np.float32)


def jitter_stain(
    image: np.ndarray, alpha: Sequence[float] | np.ndarray, beta: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Scale and shift the H, E and D stain channels of a uint8 RGB image; uint8 out.

    Written here rather than calling ``skimage.color.rgb2hed``/``hed2rgb``: those clamp negative
    stain values to zero, so even an identity jitter changes colours (measured on the seed set:
    2-10 grey levels on average, up to 160 on saturated pixels). The same matrices are used, on
    ``(v + 1) / 256`` so that black has a finite optical density and an identity jitter returns
    the input. Optical density comes from a 256-entry table per channel, which also folds in the
    3x3 map (numpy's matmul on (N, 3) arrays is slow).
    """
    matrix, offset = stain_matrix(alpha, beta)
    # tables[c, v] = contribution of channel c at level v to the jittered optical density.
    tables = _OD_TABLE[None, :, None] * matrix[:, None, :]
    tables[0] += offset
    od = tables[0][image[..., 0]]
    od += tables[1][image[..., 1]]
    od += tables[2][image[..., 2]]
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 256.0
    od -= 1.0
    np.rint(od, out=od)
    np.clip(od, 0.0, 255.0, out=od)
    return od.astype(np.uint8)


#: Outlier exposure's stains (``stain_outliers``): per H, E and D channel a scale 1 +- [0.2, 0.4]
#: and a shift +- [0.025, 0.05], one sign drawn per channel. Every channel moves at least twice as far as the
#: augmentation's jitter (``AugmentParams``: 0.1 and 0.015), so no outlier is a stain the model is
#: taught to call familiar; the far end is Tellez et al.'s "HED-light" shift (0.05), which turned
#: these smears green, yellow or black.
OUTLIER_HED_SCALE = (0.2, 0.4)
OUTLIER_HED_SHIFT = (0.025, 0.05)


def stain_outliers(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stain well beyond the augmentation's range per (N, S, S, 3) uint8 image; uint8 out.

    The cell and its shape are kept; only its colours say "a lab unlike the training labs'".
    """
    out = np.empty_like(images)
    for i, image in enumerate(images):
        # Scale and shift of a channel share a sign (more or less of that stain), so they never
        # cancel into a stain the augmentation also makes.
        signs = rng.choice([-1.0, 1.0], size=3)
        alpha = 1.0 + signs * rng.uniform(*OUTLIER_HED_SCALE, size=3)
        beta = signs * rng.uniform(*OUTLIER_HED_SHIFT, size=3)
        out[i] = jitter_stain(image, alpha, beta)
    return out


def random_affine(
    shape: tuple[int, int], rng: np.random.Generator, params: AugmentParams = DEFAULT_PARAMS
) -> tuple[np.ndarray, np.ndarray]:
    """A random rotation/flip/shear/zoom/shift about the centre.

    Returns ``(matrix, offset)`` mapping output (row, col) pixel indices to input ones, the
    convention of ``scipy.ndimage.affine_transform``.
    """
    angle = math.radians(rng.uniform(-params.rotation_degrees, params.rotation_degrees))
    shear = math.radians(rng.uniform(-params.shear_degrees, params.shear_degrees))
    zoom = rng.uniform(1.0 - params.zoom_fraction, 1.0 + params.zoom_fraction)
    flips = np.where(rng.random(2) < params.flip_probability, -1.0, 1.0)
    shift = rng.uniform(-params.shift_fraction, params.shift_fraction, size=2) * np.asarray(shape)
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[cos, -sin], [sin, cos]])
    shear_m = np.array([[1.0, 0.0], [math.tan(shear), 1.0]])
    forward = rotate @ shear_m @ np.diag(flips * zoom)
    inverse = np.linalg.inv(forward)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    return inverse, centre - inverse @ (centre + shift)


def warp_reflect(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bilinear affine warp of a uint8 RGB image with mirrored borders; uint8 out.

    The result of ``scipy.ndimage.affine_transform(..., order=1, mode="reflect")`` per channel
    (within one grey level: rounding), about four times faster at 256 px: the image is padded
    by mirroring (``np.pad`` "symmetric" is scipy's "reflect") just far enough to cover every
    sampled point, then warped by Pillow in C on uint8.
    """
    height, width = image.shape[:2]
    corners = np.array([[0, 0], [0, width - 1], [height - 1, 0], [height - 1, width - 1]], float)
    reach = corners @ matrix.T + offset
    limits = np.array([height - 1, width - 1], float)
    pad = int(math.ceil(max(0.0, -reach.min(), (reach - limits).max()))) + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    # Pillow maps output (x, y) = (col, row) to input, with pixel centres at +0.5.
    m = matrix[::-1, ::-1]
    o = offset[::-1] + pad + 0.5 - m @ np.array([0.5, 0.5])
    warped = Image.fromarray(padded).transform(
        (width, height),
        Image.Transform.AFFINE,
        (m[0, 0], m[0, 1], o[0], m[1, 0], m[1, 1], o[1]),
        resample=Image.Resampling.BILINEAR,
    )
    return np.asarray(warped, dtype=np.uint8)


def augment_image(image: np.ndarray, rng: np.random.Generator, params: AugmentParams = DEFAULT_PARAMS) -> np.ndarray:
    """One random augmentation of a (S, S, 3) uint8 RGB image; uint8 of the same shape out.

    Stain jitter first, then one bilinear affine warp with mirrored borders (no black corners
    for the model to learn).
    """
    alpha = rng.uniform(1.0 - params.hed_scale, 1.0 + params.hed_scale, size=3)
    beta = rng.uniform(-params.hed_shift, params.hed_shift, size=3)
    matrix, offset = random_affine(image.shape[:2], rng, params)
    return warp_reflect(jitter_stain(image, alpha, beta), matrix, offset)
