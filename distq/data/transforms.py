"""The standard ImageNet train/val transforms, scaled to the configured image size."""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, crop_scale: tuple[float, float], hflip: bool) -> T.Compose:
    steps = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale))]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def val_resize_size(image_size: int, crop_ratio: float) -> int:
    """Shorter-side size before the centre crop (256 for 224 at the standard 0.875)."""
    return int(round(image_size / crop_ratio))


def val_transform(image_size: int, crop_ratio: float) -> T.Compose:
    return T.Compose(
        [
            T.Resize(val_resize_size(image_size, crop_ratio)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
