"""Camera augmentation: intrinsics follow the image content exactly through decode/resize/crop/flip."""

import cv2
import numpy as np
import pytest

from bevtrain.data import augment

SRC_W, SRC_H = 1600, 900
SIGMA = 6.0  # blob size at full resolution, px


def _blob_image(path, centres):
    """A black JPEG with bright Gaussian blobs (distinct colours) centred at sub-pixel ``centres``."""
    ys, xs = np.mgrid[0:SRC_H, 0:SRC_W].astype(np.float32)
    img = np.zeros((SRC_H, SRC_W, 3), np.float32)
    rng = np.random.default_rng(0)
    for u, v in centres:
        g = np.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * SIGMA**2))
        img += g[..., None] * rng.uniform(120, 255, size=3)
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 98])


def _centroid(img_chw, u, v, radius):
    """Intensity centroid of the blob near (u, v) in an RGB (3,H,W) image."""
    gray = img_chw.astype(np.float64).sum(0)
    H, W = gray.shape
    r = int(np.ceil(radius))
    x0, x1 = int(round(u)) - r, int(round(u)) + r + 1
    y0, y1 = int(round(v)) - r, int(round(v)) + r + 1
    assert x0 >= 0 and y0 >= 0 and x1 <= W and y1 <= H, "blob too close to the border for the test"
    patch = gray[y0:y1, x0:x1]
    patch = np.clip(patch - 0.1 * patch.max(), 0, None)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return (patch * xx).sum() / patch.sum(), (patch * yy).sum() / patch.sum()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    K = np.eye(4)
    K[:3, :3] = [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]
    rng = np.random.default_rng(1)
    # Well separated image points (a jittered 5x3 grid over the central image), back-projected
    # to 3D points at random depths in front of the camera.
    gu, gv = np.meshgrid(np.linspace(420, SRC_W - 420, 5), np.linspace(260, SRC_H - 260, 3))
    uv = np.stack([gu.ravel(), gv.ravel()], 1) + rng.uniform(-20, 20, (gu.size, 2))
    depth = rng.uniform(5, 40, len(uv))
    rays = np.concatenate([uv, np.ones((len(uv), 1))], 1) @ np.linalg.inv(K[:3, :3]).T
    pts = rays * depth[:, None]
    path = tmp_path_factory.mktemp("aug") / "blobs.jpg"
    _blob_image(path, uv)
    return str(path), K, pts, uv


def _check(scene, aug, fast_decode=True, tol=0.12):
    path, K, pts, _ = scene
    img, pix_T_cam = augment.load_augmented_image(path, K, (SRC_W, SRC_H), aug, fast_decode)
    fH, fW = aug.final_hw
    assert img.shape == (3, fH, fW) and img.dtype == np.uint8
    uv = (pts @ pix_T_cam[:3, :3].T)[:, :2] / pts[:, 2:3]
    scale = aug.resize_wh[0] / SRC_W
    checked = 0
    errs = []
    for u, v in uv:
        r = 3 * SIGMA * scale + 1
        if not (r < u < fW - 1 - r and r < v < fH - 1 - r):
            continue
        cu, cv = _centroid(img, u, v, r)
        errs.append(np.hypot(cu - u, cv - v))
        checked += 1
    assert checked >= 3, "too few blobs inside the augmented image"
    assert max(errs) < tol, f"blobs are {max(errs):.3f}px from where the intrinsics put them"


def test_final_dim():
    assert augment.final_dim_for(2) == (448, 800)
    assert augment.final_dim_for(1) == (224, 400)
    assert augment.final_dim_for(0.5) == (112, 200)


@pytest.mark.parametrize("res_scale", [0.5, 1, 2])
def test_val_resize_keeps_content(scene, res_scale):
    aug = augment.sample_image_aug(None, augment.final_dim_for(res_scale), False, True)
    assert aug.resize_wh == augment.final_dim_for(res_scale)[::-1] and aug.crop_xy == (0, 0)
    _check(scene, aug)


@pytest.mark.parametrize("seed", range(4))
def test_train_crop_resize_flip_keeps_content(scene, seed):
    rng = np.random.default_rng(seed)
    aug = augment.sample_image_aug(rng, augment.final_dim_for(1), True, True, flip=bool(seed % 2))
    _check(scene, aug)


def test_flip_intrinsics_exact(scene):
    path, K, pts, _ = scene
    aug = augment.ImageAug((400, 224), (0, 0), (224, 400), flip=False)
    img, k0 = augment.load_augmented_image(path, K, (SRC_W, SRC_H), aug)
    aug.flip = True
    img_f, k1 = augment.load_augmented_image(path, K, (SRC_W, SRC_H), aug)
    assert np.array_equal(img_f, img[:, :, ::-1])
    u0 = (pts @ k0[:3, :3].T)[:, 0] / pts[:, 2]
    u1 = (pts @ k1[:3, :3].T)[:, 0] / pts[:, 2]
    np.testing.assert_allclose(u1, 400 - 1 - u0, atol=1e-9)
    assert k1[0, 0] == -k0[0, 0]


def test_reduced_decode_same_geometry_as_full_decode(scene):
    path, K, _, _ = scene
    aug = augment.sample_image_aug(None, augment.final_dim_for(1), False, True)
    fast, k_fast = augment.load_augmented_image(path, K, (SRC_W, SRC_H), aug, fast_decode=True)
    slow, k_slow = augment.load_augmented_image(path, K, (SRC_W, SRC_H), aug, fast_decode=False)
    # Different resampling filters, same pixel grid: images agree up to filter differences.
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0
    np.testing.assert_allclose(k_fast, k_slow, atol=1e-9)
    _check(scene, aug, fast_decode=False)


def test_reduction_factor():
    assert augment.reduction_factor((1600, 900), (800, 448)) == 2
    assert augment.reduction_factor((1600, 900), (400, 224)) == 4
    assert augment.reduction_factor((1600, 900), (880, 492)) == 1
    assert augment.reduction_factor((1600, 900), (200, 112)) == 8
    # training draws up to 1.2 x the validation size decode like validation and enlarge a little
    assert augment.decode_factor((1600, 900), (960, 537)) == 2
    assert augment.decode_factor((1600, 900), (961, 538)) == 1
    assert augment.decode_factor((1600, 900), (480, 268)) == 4
    assert augment.decode_factor((1600, 900), (960, 537), fast_decode=False) == 1


@pytest.mark.parametrize("x0,y0", [(0, 0), (3, 2), (-3, -2), (9, 6), (-25, 0), (30, 30)])
@pytest.mark.parametrize("flip", [False, True])
def test_window_copy_pads_flips_and_reorders_channels(x0, y0, flip):
    rng = np.random.default_rng(abs(x0 * 100 + y0))
    bgr = rng.integers(1, 256, (12, 20, 3), dtype=np.uint8)
    h, w = 10, 16
    # reference: pad the image with black, cut the window, mirror it, BGR -> RGB, HWC -> CHW
    padded = np.zeros((12 + 2 * 40, 20 + 2 * 40, 3), np.uint8)
    padded[40:52, 40:60] = bgr
    window = padded[40 + y0 : 40 + y0 + h, 40 + x0 : 40 + x0 + w]
    expected = (window[:, ::-1] if flip else window)[:, :, ::-1].transpose(2, 0, 1)
    out = np.full((3, h, w), 77, np.uint8)  # stale content must not survive
    augment._write_chw(bgr, x0, y0, flip, out)
    np.testing.assert_array_equal(out, expected)


def test_missing_image_error_names_path(tmp_path):
    aug = augment.sample_image_aug(None, (224, 400), False, True)
    with pytest.raises(augment.ImageReadError, match="nope.jpg"):
        augment.load_augmented_image(str(tmp_path / "nope.jpg"), np.eye(4), (SRC_W, SRC_H), aug)
