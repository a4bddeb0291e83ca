"""Preprocessing is stated once for every export: the packed file's header and the ONNX files'
metadata carry the same complete description (``distq.data.transforms.preprocess_description``),
and following it with PIL and numpy alone gives the validation transform's tensor."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from distq.data.transforms import preprocess_description, val_transform
from distq.export.exporter import export_checkpoint
from distq.export.format import read_export
from distq.export.onnx_export import export_onnx


def test_every_export_carries_the_same_complete_description(tiny_run, tmp_path):
    export_checkpoint(tiny_run, tmp_path / "m.safetensors")
    packed = read_export(tmp_path / "m.safetensors").header["preprocess"]
    onnx_meta = {}
    for fmt in ("onnx", "qonnx"):
        export_onnx(tiny_run, tmp_path / f"m.{fmt}.onnx", fmt)
        props = {p.key: p.value for p in onnx.load(str(tmp_path / f"m.{fmt}.onnx")).metadata_props}
        onnx_meta[fmt] = json.loads(props["preprocess"])
    assert packed == onnx_meta["onnx"] == onnx_meta["qonnx"] == preprocess_description(32, 1.0)
    assert packed["resize"] == 32 and packed["interpolation"] == "bilinear" and packed["antialias"] is True
    assert packed["pixel_range"] == [0, 1] and packed["channel_order"] == "RGB" and packed["layout"] == "NCHW"
    assert packed["crop"] == "center" and packed["resize_edge"] == "shorter" and packed["dtype"] == "float32"


def follow(image: Image.Image, d: dict) -> np.ndarray:
    """The description's steps with PIL and numpy (docs/format.md, section 11): (3, S, S) float32."""
    assert (d["resize_edge"], d["interpolation"], d["antialias"], d["crop"]) == ("shorter", "bilinear", True, "center")
    assert (d["pixel_range"], d["channel_order"], d["layout"], d["dtype"]) == ([0, 1], "RGB", "NCHW", "float32")
    rgb = image.convert("RGB")
    width, height = rgb.size
    short, long = min(width, height), max(width, height)
    other = int(d["resize"] * long / short)
    rgb = rgb.resize((d["resize"], other) if width <= height else (other, d["resize"]), Image.BILINEAR)
    size, (width, height) = d["image_size"], rgb.size
    top, left = round((height - size) / 2), round((width - size) / 2)
    pixels = np.asarray(rgb, dtype=np.float32)[top : top + size, left : left + size] / np.float32(255)
    normalised = (pixels - np.asarray(d["mean"], dtype=np.float32)) / np.asarray(d["std"], dtype=np.float32)
    return normalised.transpose(2, 0, 1)


@pytest.mark.parametrize("image_size,crop_ratio", [(32, 1.0), (24, 0.875), (28, 0.9), (20, 0.6)])
def test_following_the_description_gives_the_validation_transform(image_size, crop_ratio, digits_root, make_image_folder, tmp_path):
    description = preprocess_description(image_size, crop_ratio)
    transform = val_transform(image_size, crop_ratio)
    digit = Image.open(sorted((digits_root / "val" / "digit_3").iterdir())[0])
    noise = Image.open(sorted((make_image_folder(tmp_path, size=(40, 27)) / "val" / "cat").iterdir())[0])  # not square
    portrait = noise.transpose(Image.Transpose.ROTATE_90)
    for image in (digit, noise, portrait):
        expected = transform(image.convert("RGB")).numpy()
        got = follow(image, description)
        assert got.shape == expected.shape == (3, image_size, image_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
