"""Every way an image can be bad gives one clear ImageError naming the source; every way it can be
valid (8/16-bit, gray, RGBA, BGR on disk) gives RGB uint8."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspector.io import ImageError, list_images, read_image, to_rgb8, write_image


@pytest.fixture
def colour() -> np.ndarray:
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 200  # red channel in RGB order
    img[5:10, 5:10, 1] = 255
    return img


def test_png_roundtrip_keeps_rgb_order(tmp_path, colour):
    path = write_image(tmp_path / "a.png", colour)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, colour)


def test_bytes_and_array_inputs(tmp_path, colour):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(read_image(buf.tobytes()), colour)
    np.testing.assert_array_equal(read_image(colour), colour)


def test_16bit_gray_is_scaled_to_8bit(tmp_path):
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    path = tmp_path / "g16.png"
    assert cv2.imwrite(str(path), g16)
    out = read_image(path)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.rint(g16 / 65535 * 255).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_colour_tiff(tmp_path):
    rgb16 = np.zeros((8, 9, 3), np.uint16)
    rgb16[..., 2] = 65535  # blue in RGB order
    path = tmp_path / "c16.tif"
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    out = read_image(path)
    assert out[0, 0].tolist() == [0, 0, 255]


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:4, :, 3] = 255  # top opaque, bottom transparent
    path = tmp_path / "rgba.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    out = read_image(path)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[7, 0].tolist() == [255, 255, 255]


def test_gray_8bit_and_float_arrays():
    gray = np.full((8, 9), 128, np.uint8)
    assert read_image(gray).shape == (8, 9, 3)
    f = np.full((8, 8, 3), 0.5, np.float32)
    assert read_image(f)[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), "not a decodable image"),
        (lambda p: p.write_text("name,score\nx,1\n"), "not a decodable image"),
    ],
    ids=["empty", "corrupt", "text"],
)
def test_bad_files_raise_clear_error(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError) as err:
        read_image(path)
    assert reason in str(err.value) and "bad.png" in str(err.value)
    assert err.value.source == str(path)


def test_truncated_jpeg(tmp_path, colour):
    ok, buf = cv2.imencode(".jpg", colour)
    path = tmp_path / "trunc.jpg"
    path.write_bytes(buf.tobytes()[:40])
    with pytest.raises(ImageError):
        read_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(tmp_path)


def test_oversized_image_refused_before_decoding(tmp_path):
    big = np.zeros((300, 400, 3), np.uint8)
    path = write_image(tmp_path / "big.png", big)
    with pytest.raises(ImageError, match="too large"):
        read_image(path, max_pixels=100_000)
    assert read_image(path, max_pixels=200_000).shape == (300, 400, 3)
    with pytest.raises(ImageError, match="too large"):
        to_rgb8(big, max_pixels=1000)


@pytest.mark.parametrize("bad", [42, None, 3.5, ["a.png"], {"x": 1}])
def test_wrong_type(bad):
    with pytest.raises(ImageError, match="unsupported input type"):
        read_image(bad)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((8, 8, 5), np.uint8), "unsupported array shape"),
        (np.zeros((4,), np.uint8), "unsupported array shape"),
        (np.full((8, 8), 2.0, np.float32), "must lie in"),
        (np.full((8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((8, 8), np.int64), "unsupported pixel type"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(ImageError, match=match):
        read_image(arr)


def test_list_images_sorted_and_filtered(tmp_path, colour):
    for name in ("b.png", "a.jpg", "notes.txt", "sub/c.bmp"):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        if name.endswith(".txt"):
            p.write_text("x")
        else:
            write_image(p, colour)
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.jpg", "b.png", "sub/c.bmp"]
