"""Depth maps: the ranker's per-patch depth drawn over the image, with a histogram of the depths
beside it (the figures of the Edge-RecViT papers). Plotting needs matplotlib (``pip install recvit[viz]``).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def require_matplotlib() -> None:
    """Raise ImportError with the install hint unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError("depth maps need matplotlib: pip install 'recvit[viz]' "
                          "(or pip install matplotlib)") from error


class LoadedImage(NamedTuple):
    """shown: (S, S, 3) float in [0, 1] for display; pixels: (1, 3, S, S) model input (ImageNet
    mean/std); size: (height, width) of the file before the centre crop."""

    shown: np.ndarray
    pixels: torch.Tensor
    size: tuple


def load_image(path: str, img_size: int) -> LoadedImage:
    """Read an image file (PNG, or any format Pillow reads), centre-crop it to a square (the largest
    centred one, as evaluation transforms do; nothing is stretched) and resize it to ``img_size``.
    """
    require_matplotlib()
    import matplotlib.image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image: no such file: {path}")
    try:
        array = np.asarray(matplotlib.image.imread(path))
    except Exception as error:  # matplotlib/Pillow raise several types for unreadable files
        raise ValueError(f"image: cannot read {path}: {error}") from error
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image: expected a grey, RGB or RGBA image, got array shape {array.shape}")
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = array[top:top + side, left:left + side, :3]
    pixels = torch.from_numpy(np.ascontiguousarray(square, dtype=np.float32))
    pixels = pixels.permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear", align_corners=False,
                            antialias=True).clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return LoadedImage(resized[0].permute(1, 2, 0).numpy(), (resized - mean) / std, (height, width))


@torch.no_grad()
def depth_heatmap(model: nn.Module, image_tensor: torch.Tensor) -> torch.Tensor:
    """The ranker's depth (1..L) of every patch: (B, 3, S, S) images -> (B, grid, grid) int64."""
    tokens = model.embed(image_tensor)
    depths = model.ranker(tokens)[2][:, 1:]  # drop [CLS]
    grid = model.patch_embed.grid_size
    return depths.reshape(depths.shape[0], grid, grid)


def plot_depthmap(image, depths, path: str, num_steps: int = 12, title: str = "") -> None:
    """Save a figure to ``path``: ``image`` (H, W, 3) in [0, 1] (or a (3, H, W) tensor), the pixels
    the patches cover (with an image size off the patch grid, the top-left grid * patch_size of
    them: the grid is drawn over the whole image); the depth of every patch (``depths`` (grid, grid)
    in 1..L) drawn opaque, one colour per depth with its
    number, beside the colour bar, so a colour reads as exactly one depth; the same colours over a
    grayscale copy of the image (a colour image under a translucent map would shift the colours);
    and a histogram of the depths.
    """
    require_matplotlib()
    import matplotlib
    from matplotlib.figure import Figure

    image = image.detach().cpu().permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    image = np.asarray(image)
    depths = np.asarray(depths.detach().cpu() if isinstance(depths, torch.Tensor) else depths)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape (H, W, 3) or a (3, H, W) tensor, got {image.shape}")
    if depths.ndim != 2:
        raise ValueError(f"depths: expected shape (grid, grid), got {depths.shape}")
    if depths.size and (depths.min() < 1 or depths.max() > num_steps):
        raise ValueError(f"depths: values must lie in 1..{num_steps}, got {depths.min()}..{depths.max()}")

    cmap = matplotlib.colormaps["jet"].resampled(num_steps)  # one colour per depth, deep = red
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    style = dict(cmap=cmap, vmin=0.5, vmax=num_steps + 0.5, interpolation="nearest", extent=extent)
    figure = Figure(figsize=(19, 4.6), layout="constrained")
    image_axes, map_axes, over_axes, hist_axes = figure.subplots(1, 4, width_ratios=(1, 1.15, 1, 1.1))
    image_axes.imshow(image)
    image_axes.set_title("image")
    heat = map_axes.imshow(depths, **style)
    map_axes.set_title("depth per patch")
    rows, cols = depths.shape
    if max(rows, cols) <= 32:  # the number in each patch, black or white for contrast
        for (row, col), depth in np.ndenumerate(depths):
            shade = np.asarray(cmap((depth - 0.5) / num_steps)[:3]) @ (0.299, 0.587, 0.114)
            map_axes.text((col + 0.5) * width / cols, (row + 0.5) * height / rows, str(int(depth)),
                          ha="center", va="center", fontsize=6 if max(rows, cols) > 16 else 8,
                          color="black" if shade > 0.5 else "white")
    colorbar = figure.colorbar(heat, ax=map_axes, ticks=range(1, num_steps + 1), fraction=0.046)
    colorbar.set_label("depth (recursion steps)")
    gray = image @ np.array([0.299, 0.587, 0.114])
    over_axes.imshow(gray, cmap="gray", vmin=0, vmax=1)
    over_axes.imshow(depths, alpha=0.5, **style)
    over_axes.set_title("depth over the image (grayscale)")
    for axes in (image_axes, map_axes, over_axes):
        axes.set_axis_off()

    levels = np.arange(1, num_steps + 1)
    counts = np.array([(depths == level).sum() for level in levels])
    hist_axes.bar(levels, counts, color=cmap((levels - 0.5) / num_steps), edgecolor="black", linewidth=0.5)
    hist_axes.set_xticks(levels)
    hist_axes.set_xlim(0.4, num_steps + 0.6)
    hist_axes.set_xlabel("depth")
    hist_axes.set_ylabel("patches")
    mean = float(depths.mean()) if depths.size else float("nan")
    hist_axes.set_title(f"depth histogram ({depths.size} patches, mean depth {mean:.2f})")
    hist_axes.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
