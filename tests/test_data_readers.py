"""Image and mask reading: mode conversion and every per-file bad-input case."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from afa.data.classes import voc_palette
from afa.data.readers import DatasetError, image_size, read_image, read_mask, validate_mask, write_index_mask


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)


def test_rgb_png_round_trip(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    assert image_size(tmp_path / "a.png") == (12, 17)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(12 * 17, dtype=np.uint8).reshape(12, 17)
    Image.fromarray(gray).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (12, 17, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)


def test_rgba_drops_alpha(tmp_path, rgb):
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (10, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg", quality=100)
    image = read_image(tmp_path / "c.jpg")
    assert image.shape == (8, 10, 3)
    assert image[..., 0].min() > 200 and image[..., 1:].max() < 60


def test_palette_image_expands_to_rgb(tmp_path):
    indices = np.array([[0, 1], [2, 15]], np.uint8)
    write_index_mask(tmp_path / "p.png", indices)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), voc_palette()[indices])


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        read_image(tmp_path / "nothere.jpg")


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=r"bad\.jpg.*cannot be decoded"):
        read_image(tmp_path / "bad.jpg")


def test_truncated_image_is_an_error(tmp_path, rgb):
    Image.fromarray(np.tile(rgb, (8, 8, 1))).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"t\.jpg"):
        read_image(tmp_path / "t.jpg")


def test_unsupported_mode_is_an_error(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DatasetError, match=r"f\.tif.*mode 'F'"):
        read_image(tmp_path / "f.tif")


def test_palette_and_grayscale_masks_hold_indices(tmp_path):
    mask = np.array([[0, 1, 20], [255, 7, 0]], np.uint8)
    write_index_mask(tmp_path / "p.png", mask)
    Image.fromarray(mask).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), mask)
    assert Image.open(tmp_path / "p.png").mode == "P"


def test_rgb_coloured_mask_maps_back_to_indices(tmp_path):
    mask = np.array([[0, 1, 15], [255, 20, 3]], np.uint8)
    Image.fromarray(voc_palette()[mask]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), mask)


def test_rgb_mask_with_unknown_colour_is_an_error(tmp_path):
    colours = np.zeros((2, 2, 3), np.uint8)
    colours[0, 0] = (1, 2, 3)
    Image.fromarray(colours).save(tmp_path / "odd.png")
    with pytest.raises(DatasetError, match=r"odd\.png.*outside the VOC palette"):
        read_mask(tmp_path / "odd.png")


def test_sixteen_bit_mask_above_255_is_an_error(tmp_path):
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(DatasetError, match=r"wide\.png.*above 255"):
        read_mask(tmp_path / "wide.png")


def test_validate_mask_size_mismatch_names_both_sizes():
    with pytest.raises(DatasetError, match=r"m\.png is 4x5 .* image is 4x6"):
        validate_mask(np.zeros((4, 5), np.uint8), 20, (4, 6), "m.png")


def test_validate_mask_values_out_of_range():
    mask = np.array([[0, 21, 255, 40]], np.uint8)
    with pytest.raises(DatasetError, match=r"values \[21, 40\] outside the class range 0\.\.20"):
        validate_mask(mask, 20, (1, 4), "m.png")
    validate_mask(np.array([[0, 20, 255]], np.uint8), 20, (1, 3), "m.png")  # in range: no error
