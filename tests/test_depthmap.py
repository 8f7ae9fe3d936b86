"""Depth maps: the ranker's per-patch depths, the figure, and image loading."""
import sys

import numpy as np
import pytest
import torch

import recvit
from recvit.depthmap import IMAGENET_MEAN, IMAGENET_STD, depth_heatmap, load_image, plot_depthmap

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402


def test_depth_heatmap_is_the_rankers_patch_depths():
    model = recvit.create_model("edge_recvit_tiny", img_size=64, num_steps=6).eval()
    images = torch.randn(2, 3, 64, 64)
    heat = depth_heatmap(model, images)
    assert heat.shape == (2, 4, 4) and heat.dtype == torch.int64
    out = model(images, return_aux=True)
    assert torch.equal(heat.flatten(1), out.depths[:, 1:])  # row-major patch order, [CLS] dropped
    assert int(heat.min()) >= 1 and int(heat.max()) <= 6


def test_load_image_resizes_and_normalises(tmp_path):
    path = tmp_path / "grey.png"
    matplotlib.image.imsave(path, np.full((30, 50), 0.5), cmap="gray", vmin=0, vmax=1)  # RGBA on disk
    shown, pixels, size = load_image(str(path), 32)
    assert shown.shape == (32, 32, 3) and pixels.shape == (1, 3, 32, 32) and size == (30, 50)
    grey = shown[0, 0, 0]
    assert abs(grey - 0.5) < 0.01
    for channel in range(3):
        expected = (grey - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert torch.allclose(pixels[0, channel], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_load_image_centre_crops_a_non_square_image(tmp_path, shape):
    """A wide (tall) image keeps its centred square: the red and blue bands at the sides are cut
    off, never squeezed in."""
    image = np.zeros(shape + (3,))
    image[..., 1] = 1.0  # green
    axis = int(np.argmax(shape))
    band = [slice(None)] * 2
    band[axis] = slice(0, 10)
    image[tuple(band) + (0,)], image[tuple(band) + (1,)] = 1.0, 0.0  # red
    band[axis] = slice(shape[axis] - 10, None)
    image[tuple(band) + (2,)], image[tuple(band) + (1,)] = 1.0, 0.0  # blue
    path = tmp_path / "bands.png"
    matplotlib.image.imsave(path, image)
    shown, _, size = load_image(str(path), 24)
    assert size == shape
    np.testing.assert_allclose(shown, np.broadcast_to([0.0, 1.0, 0.0], shown.shape), atol=1e-3)


def test_plot_depthmap_writes_a_png(tmp_path):
    # A synthetic picture: a bright square on a gradient, depths deeper at the square's edges.
    y, x = np.mgrid[0:224, 0:224] / 224.0
    image = np.stack([x, 0.3 + 0.4 * y, 1.0 - x], axis=-1)
    image[64:160, 64:160] = 1.0
    depths = np.ones((14, 14), dtype=np.int64) * 2
    depths[4:10, 4:10] = 12
    depths[5:9, 5:9] = 5
    path = tmp_path / "depthmap.png"
    plot_depthmap(image, torch.from_numpy(depths), str(path), num_steps=12, title="synthetic")
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[1] > 3 * picture.shape[0]  # image, map, overlay, histogram
    assert picture[..., :3].std() > 0.05  # something was drawn
    # Depth colours are drawn opaque, so they appear exactly as on the colour bar over whole
    # patches (a translucent overlay on a colour image would shift them): depth 5 fills 16 patches.
    cmap = matplotlib.colormaps["jet"].resampled(12)
    for depth, patches in ((5, 16), (12, 20), (2, 160)):
        colour = np.asarray(cmap((depth - 0.5) / 12)[:3])
        exact = (np.abs(picture[..., :3] - colour).max(-1) < 1.5 / 255).sum()
        assert exact > patches * 200, (depth, exact)


def test_plot_depthmap_takes_a_chw_tensor(tmp_path):
    path = tmp_path / "t.png"
    plot_depthmap(torch.rand(3, 32, 32), torch.randint(1, 4, (2, 2)), str(path), num_steps=3)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("image, depths, message", [
    (np.zeros((8, 8)), np.ones((2, 2), dtype=int), "image: expected shape"),
    (np.zeros((8, 8, 3)), np.ones(4, dtype=int), "depths: expected shape"),
    (np.zeros((8, 8, 3)), np.full((2, 2), 13), "depths: values must lie in 1..12"),
])
def test_plot_depthmap_bad_input(tmp_path, image, depths, message):
    with pytest.raises(ValueError, match=message):
        plot_depthmap(image, depths, str(tmp_path / "x.png"))


def test_load_image_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="image: no such file"):
        load_image(str(tmp_path / "missing.png"), 32)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="image: cannot read"):
        load_image(str(bad), 32)


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"recvit\[viz\]"):
        plot_depthmap(np.zeros((8, 8, 3)), np.ones((2, 2), dtype=int), str(tmp_path / "x.png"))
    from recvit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["depthmap", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png")])
    assert exit_info.value.code == 2
