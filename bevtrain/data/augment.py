"""Camera images: fast JPEG decode, resize / crop / flip with exact intrinsics.

Flags and their meaning: README, "Images and augmentation".

Pixel convention: pixel centres sit at integer coordinates (cv2.resize's convention), so a resize
by (sx, sy) maps u -> sx * (u + 0.5) - 0.5 (``geometry.scale_intrinsics``), a crop at (x0, y0)
subtracts the offset, and a horizontal flip maps u -> W - 1 - u (fx -> -fx, cx -> W - 1 - cx).

Augmentation (Simple-BEV's ``sample_augmentation``), with final_dim = (fH, fW):
- training with rand_crop_and_resize: resize to (int(fW * r), int(fH * r)), r ~ U(0.8, 1.2),
  then crop an fH x fW window centred on the resized image and shifted by a random offset in
  [-crop_offset, crop_offset] per axis, crop_offset = int(fH * (1 - 0.8)). Windows that leave
  the resized image are padded with black (as PIL's crop does in Simple-BEV).
- validation (or rand_crop_and_resize off): resize straight to fW x fH, no crop. The source
  aspect (1600/900) and final_dim's (400/224) differ by 0.45 %, so sx != sy slightly; the
  intrinsics carry both scales exactly, so geometry stays exact without cropping anything away.

Simple-BEV's conventions (``compat='simplebev'``, so that its weights see what they were trained
on): its intrinsics scale the principal point as ``cx * sx`` (no half-pixel terms); at
validation it resizes the full JPEG with PIL's NEAREST straight to final_dim
(``load_simplebev_val_image``); a training flip, which Simple-BEV does inside its network (image
flipped before the encoder, features flipped back), is expressed by intrinsics that make its
feature sampling read the mirrored position: ``cx -> W * (Wf - 1) / Wf - cx`` with Wf the
stride-8 feature width (``transform_intrinsics(..., convention='simplebev')``).

Decode: when the resize shrinks the image by >= 2 (4, 8) on both axes, or would after an
enlargement by at most 1.2 (training's largest random resize; see ``decode_factor``), JPEG
decoding itself downsamples by that factor (``cv2.IMREAD_REDUCED_COLOR_*``, DCT scaling: output
pixel k is the block [f*k, f*k + f) whose centre maps exactly by the pixel-centre rule with scale
1/f), and only the remainder is resized.

Corrupt files: libjpeg decodes a truncated JPEG read from a file with a warning on stderr and the
missing rows flat grey, and cv2 returns that image as if nothing happened. So the file's bytes are
read here and checked for the JPEG start (FFD8) and end-of-image (FFD9) markers before an
in-memory decode (which fails instead of inventing rows); the decoded size is checked against the
index at every reduction factor. Corruption inside the entropy-coded data with intact markers is
refused too: ``decode_reporting`` captures libjpeg's warnings on fd 2 during the decode (one process
at a time: loader workers are processes), as ``python -m bevtrain.data.verify`` does.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

RESIZE_LIM = (0.8, 1.2)
_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# FFD9 cannot occur inside entropy-coded data (an FF there is stuffed as FF00), so finding it in the
# last bytes means the file is complete; a few writers pad after it, hence a short window.
EOI_WINDOW = 32


class ImageReadError(OSError):
    """An image that cannot be used; ``kind`` says why: missing, not_jpeg, truncated, corrupt, size."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


def final_dim_for(res_scale: float) -> Tuple[int, int]:
    """(H, W) of the network input at a given res_scale (Simple-BEV: 224x400 at scale 1)."""
    return int(224 * res_scale), int(400 * res_scale)


@dataclass
class ImageAug:
    """One camera's augmentation: resize the source to ``resize_wh``, crop at ``crop_xy``
    (top-left of the final_dim window in the resized image), then optionally flip."""

    resize_wh: Tuple[int, int]
    crop_xy: Tuple[int, int]
    final_hw: Tuple[int, int]
    flip: bool = False


def sample_image_aug(
    rng: np.random.Generator | None,
    final_dim: Tuple[int, int],
    is_train: bool,
    rand_crop_and_resize: bool,
    flip: bool = False,
    resize_lim: Tuple[float, float] = RESIZE_LIM,
) -> ImageAug:
    fH, fW = final_dim
    if is_train and rand_crop_and_resize:
        assert rng is not None, "training augmentation needs a random generator"
        r = rng.uniform(*resize_lim)
        new_w, new_h = int(fW * r), int(fH * r)
        crop_offset = int(fH * (1 - resize_lim[0]))
        crop_w = int((new_w - fW) / 2) + int(rng.uniform(-crop_offset, crop_offset))
        crop_h = int((new_h - fH) / 2) + int(rng.uniform(-crop_offset, crop_offset))
        return ImageAug((new_w, new_h), (crop_w, crop_h), (fH, fW), flip)
    return ImageAug((fW, fH), (0, 0), (fH, fW), flip)


def reduction_factor(src_wh: Tuple[int, int], dst_wh: Tuple[int, int], max_upsample: float = 1.0) -> int:
    """Largest f in {1, 2, 4, 8} with the decoded image, enlarged by at most ``max_upsample``,
    still at least as large as dst."""
    ratio = min(src_wh[0] / dst_wh[0], src_wh[1] / dst_wh[1]) * max_upsample
    for f in (8, 4, 2):
        if ratio >= f:
            return f
    return 1


def decode_factor(src_wh: Tuple[int, int], resize_wh: Tuple[int, int], fast_decode: bool = True) -> int:
    """The JPEG reduction factor ``load_augmented_image`` decodes at for a resize to ``resize_wh``.

    Training's random resize reaches ``RESIZE_LIM[1]`` (1.2) x the validation size. Decoding those
    draws at full resolution and shrinking by a non-integer factor < 2 with bilinear filtering costs
    about twice the decode time and aliases; decoding at the validation factor (the DCT's own
    low-pass) and enlarging by at most 1.2 x is faster and alias-free, at the price of no detail
    beyond the validation resolution, which the network never sees at validation anyway.
    """
    return reduction_factor(src_wh, resize_wh, RESIZE_LIM[1]) if fast_decode else 1


def read_jpeg_bytes(path: str) -> np.ndarray:
    """The bytes of a JPEG file (uint8), checked for its start and end-of-image markers."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"cannot read image {path}: {e.strerror or e}", "missing") from e
    if buf[:2].tobytes() != JPEG_SOI:
        raise ImageReadError(f"image {path} is not a JPEG (no start-of-image marker FFD8; {buf.size} bytes)",
                             "not_jpeg")
    if JPEG_EOI not in buf[-EOI_WINDOW:].tobytes():
        raise ImageReadError(
            f"image {path} is truncated: no JPEG end-of-image marker (FFD9) at its end ({buf.size} bytes); "
            f"copy the file again from the dataset",
            "truncated",
        )
    return buf


class _StderrCapture:
    """What C code prints on fd 2 while a call runs: libjpeg's only report of corrupt data (cv2 has no
    API for it; the image still decodes, with garbage where the data was bad). A few syscalls per call."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self.pid = os.getpid()  # a forked child shares the parent's file offset: it makes its own

    def call(self, fn, *args):
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        try:
            result = fn(*args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if self._file.tell() == 0:
            return result, ""
        self._file.seek(0)
        text = self._file.read().decode("utf-8", "replace").strip()
        self._file.seek(0)
        self._file.truncate()
        return result, text


_CAPTURE: _StderrCapture | None = None


def decode_reporting(buf: np.ndarray, factor: int = 1) -> Tuple[np.ndarray | None, str]:
    """cv2.imdecode at 1/factor scale and what libjpeg reported meanwhile ('' when nothing)."""
    global _CAPTURE
    if _CAPTURE is None or _CAPTURE.pid != os.getpid():
        _CAPTURE = _StderrCapture()
    img, text = _CAPTURE.call(cv2.imdecode, buf, _REDUCED_FLAGS[factor])
    if text and "jpeg" not in text.lower():  # not libjpeg's: hand it back to stderr
        print(text, file=sys.stderr, flush=True)
        text = ""
    return img, text


def decode_jpeg(path: str, factor: int = 1) -> np.ndarray:
    """BGR uint8 (h, w, 3) decoded at 1/factor scale (ceil of the size for partial blocks).

    Refuses what verify refuses: a JPEG that libjpeg reports as corrupt while decoding (garbled data
    between intact start and end markers decodes to an image with garbage in it)."""
    img, report = decode_reporting(read_jpeg_bytes(path), factor)
    if img is None:
        raise ImageReadError(f"cannot decode image {path} (corrupt JPEG)")
    if report:
        raise ImageReadError(f"image {path}: libjpeg reports corrupt data while decoding ("
                             f"{report.replace(chr(10), '; ')}); re-copy the file", kind="corrupt")
    return img


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def jpeg_size(buf: np.ndarray) -> Tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (walking the marker segments), None if not found."""
    data = buf.tobytes() if isinstance(buf, np.ndarray) else bytes(buf)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            return int.from_bytes(data[pos + 7 : pos + 9], "big"), height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def decoded_size(src_wh: Tuple[int, int], factor: int) -> Tuple[int, int]:
    """(w, h) of a ``src_wh`` JPEG decoded at 1/factor: libjpeg rounds partial blocks up."""
    return -(-src_wh[0] // factor), -(-src_wh[1] // factor)


CONVENTIONS = ("exact", "simplebev")
SIMPLEBEV_FEATURE_STRIDE = 8  # Simple-BEV's encoders output stride-8 feature maps


def transform_intrinsics(pix_T_cam: np.ndarray, steps, convention: str = "exact") -> np.ndarray:
    """Apply ('scale', sx, sy), ('crop', x0, y0), ('flip', W) steps to a (4,4) pix_T_cam.

    ``convention='simplebev'``: Simple-BEV's scaling (cx * sx) and flip (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}; valid: {', '.join(CONVENTIONS)}")
    half = 0.5 if convention == "exact" else 0.0
    k = np.array(pix_T_cam, dtype=np.float64)
    for step in steps:
        if step[0] == "scale":
            _, sx, sy = step
            k[0, 0] *= sx
            k[1, 1] *= sy
            k[0, 2] = (k[0, 2] + half) * sx - half
            k[1, 2] = (k[1, 2] + half) * sy - half
            k[0, 1] *= sx  # skew (zero in nuScenes) scales with x
        elif step[0] == "crop":
            _, x0, y0 = step
            k[0, 2] -= x0
            k[1, 2] -= y0
        elif step[0] == "flip":
            _, w = step
            k[0, :3] = -k[0, :3]
            if convention == "exact":
                k[0, 2] += w - 1
            else:
                wf = -(-w // SIMPLEBEV_FEATURE_STRIDE)
                k[0, 2] += w * (wf - 1) / wf
        else:
            raise ValueError(step)
    return k


def _write_chw(img_bgr: np.ndarray, x0: int, y0: int, flip: bool, out: np.ndarray) -> None:
    """out (3, h, w) RGB <- the (h, w) window at (x0, y0) of img_bgr (H, W, 3), black outside the
    image, mirrored left-right if ``flip``: crop, flip, BGR->RGB and HWC->CHW in one strided copy."""
    _, h, w = out.shape
    H, W = img_bgr.shape[:2]
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + w, W), min(y0 + h, H)
    if sx1 <= sx0 or sy1 <= sy0:
        out[...] = 0
        return
    dx0, dy0 = sx0 - x0, sy0 - y0
    dx1, dy1 = dx0 + sx1 - sx0, dy0 + sy1 - sy0
    if (dx0, dy0, dx1, dy1) != (0, 0, w, h):
        out[...] = 0
    src = img_bgr[sy0:sy1, sx0:sx1]  # BGR (dy1 - dy0, dx1 - dx0, 3) view
    if flip:  # output column u shows window column w - 1 - u
        src = cv2.flip(src, 1)
        dx0, dx1 = w - dx1, w - dx0
    planes = [out[c, dy0:dy1, dx0:dx1] for c in (2, 1, 0)]  # B, G, R destination views
    # cv2.split writes straight into the strided views (about 5x faster than numpy's transposing
    # copy); should a build ever hand back new arrays instead, copy them over.
    for dst, plane in zip(planes, cv2.split(src, planes)):
        if plane is not dst:
            dst[...] = plane


def load_augmented_image(
    path: str,
    pix_T_cam: np.ndarray,
    src_wh: Tuple[int, int],
    aug: ImageAug,
    fast_decode: bool = True,
    out: np.ndarray | None = None,
    convention: str = "exact",
) -> Tuple[np.ndarray, np.ndarray]:
    """Decode + resize + crop + flip one image (intrinsics in ``convention``, see transform_intrinsics).

    Returns (RGB uint8 (3, fH, fW), pix_T_cam (4,4) float64 for that image). With ``out`` (a
    (3, fH, fW) uint8 array, e.g. one camera of a preallocated (S, 3, fH, fW) batch) the image is
    written there and ``out`` is returned, saving the copies of a separate stack.
    """
    new_w, new_h = aug.resize_wh
    f = decode_factor(src_wh, (new_w, new_h), fast_decode)
    img = decode_jpeg(path, f)
    steps = []
    if f > 1:
        steps.append(("scale", 1.0 / f, 1.0 / f))
    dec_h, dec_w = img.shape[:2]
    want_wh = decoded_size(src_wh, f)
    if (dec_w, dec_h) != want_wh:
        at = f" at 1/{f} scale (expected {want_wh[0]}x{want_wh[1]})" if f > 1 else ""
        raise ImageReadError(
            f"image {path} decodes to {dec_w}x{dec_h}{at}, but the dataset says {src_wh[0]}x{src_wh[1]}",
            "size",
        )
    if (dec_w, dec_h) != (new_w, new_h):
        # The remaining shrink is in [1/1.2, 2/1.2): bilinear neither aliases much nor blurs much.
        interp = cv2.INTER_AREA if f == 1 and (new_w * 2 <= dec_w) else cv2.INTER_LINEAR
        img = cv2.resize(img, (new_w, new_h), interpolation=interp)
        steps.append(("scale", new_w / dec_w, new_h / dec_h))
    fH, fW = aug.final_hw
    x0, y0 = aug.crop_xy
    if (x0, y0) != (0, 0) or (new_w, new_h) != (fW, fH):
        steps.append(("crop", x0, y0))
    if aug.flip:
        steps.append(("flip", fW))
    if out is None:
        out = np.empty((3, fH, fW), np.uint8)
    _write_chw(img, x0, y0, aug.flip, out)
    return out, transform_intrinsics(pix_T_cam, steps, convention)


def load_simplebev_val_image(
    path: str, pix_T_cam: np.ndarray, src_wh: Tuple[int, int], final_hw: Tuple[int, int],
    out: np.ndarray | None = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Simple-BEV's validation image: the full JPEG resized by PIL NEAREST straight to final_dim.

    Returns (RGB uint8 (3, fH, fW), pix_T_cam (4,4) float64 in Simple-BEV's convention)."""
    from PIL import Image

    fH, fW = final_hw
    try:
        with Image.open(path) as img:
            if img.size != tuple(src_wh):
                w, h = img.size
                raise ImageReadError(f"image {path} is {w}x{h}, but the dataset says {src_wh[0]}x{src_wh[1]}")
            rgb = np.asarray(img.convert("RGB").resize((fW, fH), Image.NEAREST))  # (fH, fW, 3)
    except ImageReadError:
        raise
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken JPEG headers
        raise ImageReadError(f"cannot read image {path} (missing or corrupt): {e}") from e
    if out is None:
        out = np.empty((3, fH, fW), np.uint8)
    out[...] = rgb.transpose(2, 0, 1)
    steps = [("scale", fW / float(src_wh[0]), fH / float(src_wh[1]))]
    return out, transform_intrinsics(pix_T_cam, steps, "simplebev")
