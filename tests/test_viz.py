import numpy as np
import pytest
import torch

from afa.data.classes import voc_palette
from afa.viz import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    affinity_map,
    cam_overlay,
    colorize_labels,
    denormalize_image,
    jet_colormap,
    make_panel,
)


def test_colorize_labels_uses_voc_palette_including_ignore():
    labels = torch.tensor([[0, 1], [15, 255]])
    colours = colorize_labels(labels)
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    palette = voc_palette()
    for (row, col), value in np.ndenumerate(labels.numpy()):
        np.testing.assert_array_equal(colours[row, col], palette[value])
    np.testing.assert_array_equal(colours[0, 1], [128, 0, 0])  # aeroplane
    np.testing.assert_array_equal(colours[1, 1], [224, 224, 192])  # ignore
    assert colorize_labels(np.zeros((4, 5, 6), dtype=np.int64)).shape == (4, 5, 6, 3)  # batched
    with pytest.raises(ValueError, match="256"):
        colorize_labels(np.array([[256]]))
    with pytest.raises(TypeError):
        colorize_labels(np.zeros((2, 2), dtype=np.float32))


def test_denormalize_inverts_imagenet_normalisation():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 5, 7, 3)).astype(np.uint8)  # (B, H, W, 3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - mean) / std
    np.testing.assert_array_equal(denormalize_image(normalised), pixels)
    np.testing.assert_array_equal(denormalize_image(normalised[0]), pixels[0])
    with pytest.raises(ValueError, match="shape"):
        denormalize_image(torch.zeros(4, 5, 5))


def test_jet_colormap_endpoints_and_ordering():
    colours = jet_colormap(np.array([0.0, 0.5, 1.0, -3.0, 7.0]))
    np.testing.assert_array_equal(colours[0], [0, 0, 128])  # dark blue
    np.testing.assert_array_equal(colours[1], [128, 255, 128])  # green-ish middle
    np.testing.assert_array_equal(colours[2], [128, 0, 0])  # dark red
    np.testing.assert_array_equal(colours[3], colours[0])  # clipped
    np.testing.assert_array_equal(colours[4], colours[2])
    ramp = jet_colormap(np.linspace(0, 1, 101)).astype(int)
    assert np.argmax(ramp[:, 2]) < np.argmax(ramp[:, 1]) < np.argmax(ramp[:, 0])  # blue, green, red


def test_cam_overlay_resizes_and_blends():
    image = np.full((2, 32, 48, 3), 100, dtype=np.uint8)
    cam = torch.zeros(2, 4, 6)
    cam[:, :, 3:] = 1.0  # right half hot
    overlay = cam_overlay(image, cam, alpha=1.0)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    np.testing.assert_array_equal(overlay[0, 5, 2], [0, 0, 128])
    np.testing.assert_array_equal(overlay[1, 5, 45], [128, 0, 0])
    half = cam_overlay(image[0], cam[0], alpha=0.5)
    np.testing.assert_array_equal(half[5, 2], [50, 50, 114])
    with pytest.raises(ValueError):
        cam_overlay(image.astype(np.float32), cam)


def test_affinity_map_shows_each_query_row():
    height, width = 3, 4
    affinity = torch.zeros(height * width, height * width)
    affinity[0, 0] = 1.0  # query (0, 0) likes only itself
    affinity[11, :] = torch.arange(12.0)  # query (2, 3) increases along raster order
    strip = affinity_map(affinity, (height, width), [(0, 0), (2, 3)], size=(30, 40))
    assert strip.dtype == np.uint8 and strip.shape == (30 + 4, 2 * 40 + 6, 3)
    first = strip[2:32, 2:42]
    second = strip[2:32, 44:84]
    np.testing.assert_array_equal(first[25, 35], [0, 0, 128])  # far from the query: low
    np.testing.assert_array_equal(second[2, 2], [0, 0, 128])  # raster start: lowest
    np.testing.assert_array_equal(second[25, 35], [255, 255, 255])  # query (2, 3) marker
    np.testing.assert_array_equal(first[5, 5], [255, 255, 255])  # query marker
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    over = affinity_map(affinity.numpy(), (height, width), [(1, 1)], image=image)
    assert over.shape == (24 + 4, 32 + 4, 3)
    with pytest.raises(ValueError, match="grid"):
        affinity_map(affinity, (3, 4), [(3, 0)])
    with pytest.raises(ValueError, match="h\\*w"):
        affinity_map(affinity, (4, 4), [(0, 0)])


def test_make_panel_layout_and_titles():
    red = np.zeros((10, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    grey = np.full((6, 4), 50, dtype=np.uint8)
    panel = make_panel([red, grey, red], ncols=2, gap=2)
    assert panel.shape == (2 * (10 + 2) + 2, 2 * (8 + 2) + 2, 3)
    np.testing.assert_array_equal(panel[2:12, 2:10], red)
    np.testing.assert_array_equal(panel[2 + 2 : 2 + 8, 12 + 2 : 12 + 6], np.full((6, 4, 3), 50))  # centred
    np.testing.assert_array_equal(panel[14:24, 2:10], red)
    assert (panel[0] == 255).all()
    titled = make_panel([red, red], titles=["image", "cam"])
    assert titled.shape == (10 + 14 + 4, 2 * 8 + 6, 3)
    assert (titled[2:16, 2:10] < 255).any()  # some title ink
    np.testing.assert_array_equal(titled[16:26, 2:10], red)
    with pytest.raises(ValueError, match="titles"):
        make_panel([red], titles=["a", "b"])
    with pytest.raises(TypeError, match="uint8"):
        make_panel([red.astype(np.float32)])
