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


def preprocess_description(image_size: int, crop_ratio: float, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """``val_transform(image_size, crop_ratio)`` stated completely, as every export's header
    carries it (the packed file's ``preprocess``, the ONNX files' ``preprocess`` metadata;
    docs/format.md, "Preprocessing"): what a runtime without torchvision must do to an image."""
    image_size, crop_ratio = int(image_size), float(crop_ratio)
    resize = val_resize_size(image_size, crop_ratio)
    return {
        "image_size": image_size,
        "val_crop_ratio": crop_ratio,
        "resize": resize,
        "resize_edge": "shorter",
        "interpolation": "bilinear",
        "antialias": True,
        "crop": "center",
        "pixel_range": [0, 1],
        "mean": [float(m) for m in mean],
        "std": [float(v) for v in std],
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "steps": [
            "decode the image to 8-bit RGB",
            f"resize so that the shorter side is {resize} pixels, the longer side int({resize} * long / short) "
            "(rounded down), bilinear with antialiasing (PIL Image.resize, Image.BILINEAR)",
            f"crop the centre {image_size} x {image_size}: top = round((height - {image_size}) / 2), "
            f"left = round((width - {image_size}) / 2), rounding half to even",
            "divide the 8-bit values by 255, to [0, 1]",
            "per channel (R, G, B): subtract mean, divide by std",
            "lay out as float32 N x 3 x H x W (NCHW), channels in RGB order",
        ],
    }
