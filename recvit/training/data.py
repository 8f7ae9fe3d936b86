"""Image data for training and evaluation: an ImageFolder (one sub-folder of images per class).

torchvision's ``ImageFolder`` and transforms are used where torchvision imports (the CUDA machines
have it); elsewhere (there is no CPU build of torchvision here) a small Pillow loader takes its place:
the same class order and file extensions, and transforms that repeat torchvision's step for step
(the same random draws, rounding and PIL calls), so both give the same tensors.

Augmentation is reproducible per sample: the random crop and flip of sample ``i`` in epoch ``e``
are drawn from a generator seeded by ``(seed, e, i)``, whatever process or data-loader worker loads
it. That is what lets ``--resume`` continue a run exactly, mid-epoch included.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's IMG_EXTENSIONS, so both loaders see the same files.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_CROP = 0.875  # DeiT's test-time resize: shorter side to size / 0.875, then a centre crop


def have_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a torchvision built against another torch
        return False
    return True


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("image folders need Pillow without torchvision: pip install 'recvit[train]' "
                          "(or pip install pillow)") from error
    return Image


class UnreadableImageError(ValueError):
    """An image file that Pillow cannot decode (not an image, truncated, corrupt); the message names it."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises this class with its whole traceback as the message: keep our line.
        super().__init__(message.rstrip().rsplit(f"{__name__}.{type(self).__name__}: ", 1)[-1])


def load_rgb(path: str):
    """The image at ``path`` as an RGB PIL image (torchvision's ``pil_loader``); an
    :class:`UnreadableImageError` naming the file when it cannot be decoded."""
    Image = _require_pillow()
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for bad or truncated files
        raise UnreadableImageError(f"{path}: cannot read this image (not an image, truncated or corrupt?): "
                                   f"{type(error).__name__}: {error}; remove or replace the file") from None


def find_classes(root: str) -> list[str]:
    """Sorted names of the class sub-folders of ``root`` (torchvision's order)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root: no such directory: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"root: {root} has no class sub-folders (expected {root}/<class>/<image>)")
    return classes


def find_samples(root: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(image path, class index) of every image under ``root/<class>/`` (torchvision's order and
    extensions); a ValueError naming ``root`` when there is none, or naming the class folders
    without images (torchvision's ImageFolder refuses them too: a class without images cannot be learnt)."""
    samples = []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples.extend((os.path.join(folder, file), index) for file in sorted(files)
                           if file.lower().endswith(IMG_EXTENSIONS))
    if not samples:
        raise ValueError(f"root: no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    found = {target for _, target in samples}
    empty = [name for index, name in enumerate(classes) if index not in found]
    if empty:
        raise ValueError(f"root: class folder(s) of {root} without images ({', '.join(IMG_EXTENSIONS)}): "
                         f"{', '.join(empty)}")
    return samples


class ImageFolder(Dataset):
    """Pillow-only ImageFolder: ``root/<class>/**/<image>`` -> (transform(RGB image), class index)."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        self.root, self.transform = root, transform
        self.classes = find_classes(root)
        self.samples = find_samples(root, self.classes)
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = load_rgb(path)
        return (image if self.transform is None else self.transform(image)), target


# ----------------------------------------------------------------------------------------------
# The Pillow transforms: torchvision's RandomResizedCrop, RandomHorizontalFlip, Resize + CenterCrop,
# ToTensor and Normalize on PIL images, step for step (the same random draws from torch's global
# generator, the same rounding, the same PIL calls), so both give the same tensors.


class _RandomResizedCrop:
    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, image):
        width, height = image.size
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                break
        else:  # a centre crop within the ratio range
            in_ratio = float(width) / float(height)
            if in_ratio < min(self.ratio):
                w, h = width, int(round(width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                w, h = int(round(height * max(self.ratio))), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        crop = image.crop((left, top, left + w, top + h))
        return crop.resize((self.size, self.size), _require_pillow().BILINEAR)


def _flip(image):
    if torch.rand(1) < 0.5:
        return image.transpose(_require_pillow().FLIP_LEFT_RIGHT)
    return image


class _ResizeCenterCrop:
    def __init__(self, size: int):
        self.size, self.resize = size, int(size / EVAL_CROP)

    def __call__(self, image):
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), _require_pillow().BILINEAR)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


def _to_normalized_tensor(image) -> torch.Tensor:
    import numpy as np

    pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def _compose(steps: Sequence[Callable]) -> Callable:
    def apply(image):
        for step in steps:
            image = step(image)
        return image
    return apply


def build_transform(img_size: int, train: bool, min_scale: float = 0.08,
                    torchvision: Optional[bool] = None) -> Callable:
    """Training: random resized crop (area ``min_scale``..1) + horizontal flip; evaluation: resize
    to ``img_size / 0.875`` and centre crop; then ImageNet normalisation (no MixUp/CutMix: the paper
    leaves label mixing out, it confuses the ranker's supervision). ``torchvision``: use its
    transforms (True), the Pillow ones (False), or torchvision where it imports (None)."""
    if torchvision is None:
        torchvision = have_torchvision()
    if torchvision:
        from torchvision import transforms as T

        steps = ([T.RandomResizedCrop(img_size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip()] if train
                 else [T.Resize(int(img_size / EVAL_CROP)), T.CenterCrop(img_size)])
        return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    steps = ([_RandomResizedCrop(img_size, scale=(min_scale, 1.0)), _flip] if train
             else [_ResizeCenterCrop(img_size)])
    return _compose(steps + [_to_normalized_tensor])


def image_folder(root: str, img_size: int, train: bool, min_scale: float = 0.08,
                 torchvision: Optional[bool] = None) -> Dataset:
    """torchvision's ImageFolder and transforms, or :class:`ImageFolder` with the Pillow ones
    (``torchvision`` as in :func:`build_transform`); ``.classes`` lists the class names in index order."""
    if torchvision is None:
        torchvision = have_torchvision()
    transform = build_transform(img_size, train, min_scale, torchvision)
    if torchvision:
        from torchvision.datasets import ImageFolder as TorchvisionImageFolder

        find_samples(root, find_classes(root))  # recvit's errors with either loader (the folder is listed twice)
        return TorchvisionImageFolder(root, transform=transform, loader=load_rgb)
    return ImageFolder(root, transform)


class SeededSamples(Dataset):
    """``dataset[i]`` with torch's global generator seeded by (seed, epoch, i) for the call, so a
    sample's augmentation is the same in every process and worker (``set_epoch`` each epoch)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (2 ** 63))
            return self.dataset[index]


# ----------------------------------------------------------------------------------------------
# A small data set whose classes can be seen, for smoke tests and the README's first run.

SHAPES = ("disc", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}


def make_shapes_dataset(root: str, images_per_class: int = 32, val_per_class: int = 8, size: int = 32,
                        classes: Sequence[str] = ("red-disc", "green-square", "blue-triangle", "yellow-cross"),
                        seed: int = 0) -> list[str]:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: each image one coloured
    shape (class ``"<colour>-<shape>"``, colours from :data:`COLOURS`, shapes from :data:`SHAPES`) of
    random size and place on a noisy grey background (``val_per_class=0``: no ``val/``). Returns the
    class names."""
    Image = _require_pillow()
    from PIL import ImageDraw

    for name in classes:
        colour, _, shape = name.partition("-")
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"classes: {name!r} is not '<colour>-<shape>' with a colour in "
                             f"{sorted(COLOURS)} and a shape in {SHAPES}")
    generator = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(1, generator=generator).item()

    for split, count in (("train", images_per_class), ("val", val_per_class)):
        for name in classes if count else ():  # no val/ folder at all without val images
            colour, _, shape = name.partition("-")
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                noise = (torch.rand(size, size, 1, generator=generator) * 60 + 100).expand(size, size, 3)
                image = Image.fromarray(noise.to(torch.uint8).numpy())
                draw = ImageDraw.Draw(image)
                radius = uniform(0.18, 0.35) * size
                cx, cy = uniform(radius, size - radius), uniform(radius, size - radius)
                fill = tuple(min(255, max(0, int(c + uniform(-25, 25)))) for c in COLOURS[colour])
                if shape == "disc":
                    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
                elif shape == "square":
                    draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
                elif shape == "triangle":
                    draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                                 fill=fill)
                else:
                    bar = radius / 3
                    draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
                    draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
                image.save(os.path.join(folder, f"{i:04d}.png"))
    return list(classes)
