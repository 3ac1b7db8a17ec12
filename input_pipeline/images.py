"""Source images (JPEG, PNG, DICOM) -> uint16 grayscale, the pixels every builder writes.

Pure numpy, Pillow and pydicom; no TensorFlow, so builder worker processes stay light.

    image = load_image("files/p10/p10000032/s50414267/02aa804e.dcm")  # uint16 [H, W]
    image = resize_max_side(image, 512)
    png = encode_png(image)  # 16-bit grayscale PNG bytes

Every image is mapped onto the full uint16 range [0, 65535]:

- 8-bit rasters (JPEG, 8-bit PNG, anything Pillow reads as L/RGB/P): value * 257, so
  255 -> 65535 exactly; colour images are converted to luminance first.
- 16-bit PNG/TIFF: kept as they are.
- DICOM (PS3.3 C.11, the grayscale pipeline): stored values (pydicom masks the bits
  beyond BitsStored and sign-extends signed data) -> Modality LUT or RescaleSlope /
  RescaleIntercept -> VOI: the first VOI LUT if the file has one, else the first
  WindowCenter / WindowWidth pair with its VOILUTFunction (LINEAR, LINEAR_EXACT or
  SIGMOID), onto [0, 1]; with neither, the image's own minimum and maximum span [0, 1]
  -> MONOCHROME1 inverted (its low values are white) -> scaled to [0, 65535].
  Compressed transfer syntaxes decode where one of pydicom's installed decoders handles
  them (Pillow covers JPEG baseline/extended and JPEG 2000; install the `dicom-codecs`
  extra, `pip install -e '.[dicom-codecs]'`, for JPEG-LS and JPEG lossless). Where none
  is installed the error lists every decoder pydicom knows and the package it lacks.

Anything that cannot be read raises `ImageDecodeError`, which names the file and why.
"""

from __future__ import annotations

import io
import math
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

UINT16_MAX = 65535
# The setup.py extra with pydicom's decoders for JPEG-LS and JPEG lossless.
DICOM_CODECS_INSTALL = "pip install -e '.[dicom-codecs]'"
DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128  # "DICM" follows the 128-byte preamble of a DICOM file.


class ImageDecodeError(ValueError):
    """An image file that cannot be turned into pixels; `path` and `reason` say which, why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_image(path: str | os.PathLike, *, max_size: int | None = None) -> np.ndarray:
    """The image at `path` as uint16 [H, W], full range (see the module docstring).

    `max_size` is a hint that the caller will downscale to that longest side: JPEGs are
    then decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least that large,
    which is several times faster. The result can still be larger than `max_size`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageDecodeError(path, "file not found")
    if is_dicom(path):
        return load_dicom(path)
    return _load_raster(path, max_size)


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a .dcm/.dicom name or a file with the DICOM preamble magic."""
    path = os.fspath(path)
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    with open(path, "rb") as f:
        f.seek(_DICOM_MAGIC_OFFSET)
        return f.read(4) == b"DICM"


def load_dicom(path: str | os.PathLike) -> np.ndarray:
    """A single-frame grayscale DICOM file as uint16 [H, W] (see the module docstring)."""
    import pydicom

    path = os.fspath(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many kinds on a broken file.
        raise ImageDecodeError(path, f"not a readable DICOM file ({_first_line(e)})") from e
    return to_uint16(dicom_unit_range(ds, path))


def dicom_unit_range(ds, path: str = "<dataset>") -> np.ndarray:
    """float64 [H, W] in [0, 1] from a pydicom Dataset: modality LUT, VOI, MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    if "PixelData" not in ds:
        raise ImageDecodeError(path, "DICOM file has no PixelData")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(path, f"PhotometricInterpretation {photometric}: only "
                                     "MONOCHROME1/MONOCHROME2 (grayscale) are supported")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageDecodeError(path, f"{frames} frames: only single-frame images are "
                                     "supported")
    try:
        stored = ds.pixel_array
    except Exception as e:  # No decoder, or corrupt encapsulated data.
        raise ImageDecodeError(path, _pixel_decode_failure(ds, e)) from e
    if stored.ndim != 2:
        raise ImageDecodeError(path, f"pixel data of shape {stored.shape}; expected [H, W]")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        # LUT inputs are integers (PS3.3 C.11.2.1.1); rescaled values are rounded to them.
        indices = np.round(values).astype(np.int64)
        unit = _voi_lut_unit(apply_voi(indices, ds, index=0), ds.VOILUTSequence[0])
    else:
        window = _first_window(ds)
        if window is not None:
            unit = apply_window(values, *window, function=str(ds.get("VOILUTFunction",
                                                                     "LINEAR")))
        else:
            unit = min_max_unit(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def apply_window(values: np.ndarray, center: float, width: float,
                 function: str = "LINEAR") -> np.ndarray:
    """A DICOM VOI window (PS3.3 C.11.2.1.2) onto [0, 1] instead of a display range."""
    x = np.asarray(values, dtype=np.float64)
    function = function.upper()
    if function == "LINEAR":
        # Values <= c - 0.5 - (w - 1) / 2 are black, > c - 0.5 + (w - 1) / 2 white.
        unit = (x - (center - 0.5)) / (width - 1) + 0.5 if width > 1 else (
            (x > center - 0.5).astype(np.float64))
    elif function == "LINEAR_EXACT":
        unit = (x - center) / width + 0.5
    elif function == "SIGMOID":
        unit = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        raise ValueError(f"VOILUTFunction {function!r}; expected LINEAR, LINEAR_EXACT or "
                         "SIGMOID")
    return np.clip(unit, 0.0, 1.0)


def min_max_unit(values: np.ndarray) -> np.ndarray:
    """`values` stretched so their minimum is 0 and maximum 1 (all 0 when constant)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def to_uint16(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint16 [0, 65535], rounded to nearest."""
    return np.round(np.clip(unit, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)


def resize_max_side(image: np.ndarray, max_size: int | None) -> np.ndarray:
    """`image` (uint16 [H, W]) shrunk so its longer side is `max_size`, aspect kept.

    Images already within `max_size` (or `max_size` None/0) come back unchanged; images
    are never enlarged. Antialiased bilinear, computed in float32.
    """
    if max_size is None or max_size <= 0:
        return image
    height, width = image.shape
    longest = max(height, width)
    if longest <= max_size:
        return image
    scale = max_size / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(image.astype(np.float32)).resize(
        size, Image.Resampling.BILINEAR)
    return np.round(np.clip(np.asarray(resized), 0, UINT16_MAX)).astype(np.uint16)


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 or uint16 [H, W] -> 8- or 16-bit grayscale PNG bytes (the same bytes for the
    same pixels with the same Pillow and zlib). `compress_level`: zlib's, 0-9."""
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
        raise ValueError(f"expected uint8 or uint16 [H, W], got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_png16(data: bytes) -> np.ndarray:
    """16-bit grayscale PNG bytes (as `encode_png` writes for uint16) -> uint16 [H, W],
    the values `tf.io.decode_png(data, dtype=tf.uint16)` gives."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"expected a 16-bit grayscale PNG, got {image.format} "
                             f"mode {image.mode}")
        # Some Pillow versions open 16-bit PNG as "I" (int32 holding the samples).
        return np.asarray(image).astype(np.uint16)


class ImageJob(NamedTuple):
    """One image of a build: where it is and the longest side to keep (None: all)."""

    path: str
    max_size: int | None


class EncodedImage(NamedTuple):
    """The outcome of an ImageJob: PNG bytes, or None with the bad-row reason and detail."""

    png: bytes | None
    reason: str = ""
    detail: str = ""


MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"


def encode_job(job: ImageJob) -> EncodedImage:
    """Loads, downscales and PNG-encodes one image; a bad file becomes a reason, not an
    exception, so one broken image never stops a build."""
    if not os.path.isfile(job.path):
        return EncodedImage(None, MISSING_IMAGE, f"{job.path}: file not found")
    try:
        image = resize_max_side(load_image(job.path, max_size=job.max_size), job.max_size)
    except ImageDecodeError as e:
        return EncodedImage(None, UNREADABLE_IMAGE, str(e))
    except Exception as e:  # Decoders raise anything (OSError, MemoryError, ...).
        return EncodedImage(None, UNREADABLE_IMAGE, f"{job.path}: {_first_line(e)}")
    return EncodedImage(encode_png(image))


def _load_raster(path: str, max_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if max_size and image.format == "JPEG":
                # draft keeps both sides >= the request: ask for the downscaled size.
                scale = max_size / max(image.size)
                if scale < 1:
                    image.draft("L", (math.ceil(image.size[0] * scale),
                                      math.ceil(image.size[1] * scale)))
            image = ImageOps.exif_transpose(image)
            image.load()
            return _raster_to_uint16(image)
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow: UnidentifiedImageError, truncated files (OSError), ...
        raise ImageDecodeError(path, f"not a readable image ({_first_line(e)})") from e


def _raster_to_uint16(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":  # 16-bit PNGs on some Pillow versions; values are the 16-bit samples.
        return np.clip(np.asarray(image), 0, UINT16_MAX).astype(np.uint16)
    if mode == "F":
        return to_uint16(min_max_unit(np.asarray(image)))
    if mode != "L":
        image = image.convert("L")
    return np.asarray(image).astype(np.uint16) * 257  # 255 * 257 = 65535.


def _first_window(ds) -> tuple[float, float] | None:
    """The first (WindowCenter, WindowWidth) pair, or None when absent or unusable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = float(center[0] if _is_multi(center) else center)
    width = float(width[0] if _is_multi(width) else width)
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    return center, width


def _voi_lut_unit(mapped: np.ndarray, item) -> np.ndarray:
    """VOI LUT output onto [0, 1]: entries have LUTDescriptor[2] bits (PS3.3 C.11.2.1.1),
    or more when the file understates them."""
    bits = int(item.LUTDescriptor[2])
    top = max(2.0**bits - 1, float(np.max(mapped)))
    return np.clip(np.asarray(mapped, dtype=np.float64) / top, 0.0, 1.0)


def _is_multi(value) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def _transfer_syntax_name(ds) -> str:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return "unknown transfer syntax"
    return f"{syntax.name} {syntax}" if syntax.name != str(syntax) else str(syntax)


def _pixel_decode_failure(ds, error: BaseException) -> str:
    """Why `ds.pixel_array` failed, in one line: pydicom's whole message (it lists each
    decoder and the package it lacks) and, when no installed decoder handles the transfer
    syntax, how to install one."""
    text = f"cannot decode pixel data ({_transfer_syntax_name(ds)}): {one_line(error)}"
    if not _decoder_installed(ds):
        text += f"; install the decoders with: {DICOM_CODECS_INSTALL}"
    return text


def _decoder_installed(ds) -> bool:
    """False when pydicom knows a decoder for the transfer syntax but none of its
    plugins has its dependencies installed (True when unsure)."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return True
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # No decoder at all: no package would help.
        return True


def one_line(error: BaseException) -> str:
    """`Type: message` with the message's lines joined (after a line ending in ":" by a
    space, else by "; "), so a multi-line message fits one log or report line whole."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = ""
    for line in lines:
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
