"""The export file: a safetensors file whose metadata holds a JSON header.

Layout (all of it standard safetensors, so any safetensors reader can list the tensors)::

    8 bytes   little-endian length N of the safetensors header
    N bytes   safetensors JSON header: tensor names, dtypes, shapes, byte offsets, and
              "__metadata__": {"distq": "<JSON header below>"}
    ...       tensor data

The distq header says everything needed to run the model without its training config::

    format      "distq.export"
    version     the oldest format version that reads the file right: 1, or 2 when a layer's
                quantizer method is newer than format 1 (LSQ, PACT: ``QuantMethod.export_version``);
                a reader refuses files newer than itself (FORMAT_VERSION)
    model       the model config (arch, width, small_input, num_classes)
    quant       the quantizer config the model was trained with (for the record)
    preprocess  the validation transform, complete: image_size, val_crop_ratio, resize and its rule,
                interpolation, crop, [0, 1] scaling, mean, std, RGB, NCHW
                (``distq.data.transforms.preprocess_description``, the same in the ONNX exports)
    classes     class names (the dataset's class folders, e.g. ImageNet wnids), in logit order
    class_names optional: readable names in logit order ("tench, Tinca tinca"), from the
                dataset's table (ROOT/class_names.json or a shards folder's index.json)
    layers      {module name: record} in module order (see distq.export.exporter)
    source      checkpoint path, model name, epoch and training data root (for the record,
                and the default dataset of ``distq eval --engine int``)
    sha256      digest of every tensor's bytes in name order: catches corrupted data,
                which the safetensors header alone cannot

Quantized weights are stored as bit planes (``pack_planes``): plane j holds bit j of every
code of the flattened tensor, eight codes per byte, so a k-bit tensor of n weights takes
k * ceil(n / 8) bytes, k/32 of its float32 size up to the last byte.

docs/format.md is the specification of this format, for readers without distq.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distq.errors import DistqError

FORMAT = "distq.export"
FORMAT_VERSION = 2
"""The newest format this distq reads: 2 added the methods whose integers format 1 does not know (LSQ, PACT)."""
METADATA_KEY = "distq"
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


class ExportError(DistqError):
    """An export file is missing, corrupt, truncated, or from a newer distq."""


@dataclass
class ExportFile:
    """An export file in memory: the distq header and the named tensors."""

    header: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ExportError(f"export file is corrupt: tensor {name!r} named by its header is missing")
        return self.tensors[name]


# --- bit-plane storage --------------------------------------------------------------------


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes (any shape) -> uint8 tensor (bits, ceil(n / 8)).

    Bit i of byte b of plane j is bit j of code 8b + i of the flattened tensor.
    """
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    n = flat.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
    padded[:n] = flat
    groups = padded.view(-1, 8)  # uint8 throughout: a byte per code, whatever the layer's size
    return torch.stack([(((groups >> j) & 1) * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8) for j in range(bits)])


def unpack_planes(planes: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_planes``: uint8 (bits, nbytes) -> uint8 codes of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    if planes.dtype != torch.uint8 or tuple(planes.shape) != (bits, -(-n // 8)):
        raise ExportError(
            f"export file is corrupt: packed weights have shape {tuple(planes.shape)} {planes.dtype}, "
            f"expected ({bits}, {-(-n // 8)}) uint8 for {bits}-bit codes of shape {tuple(shape)}"
        )
    codes = torch.zeros(planes.shape[1] * 8, dtype=torch.uint8)
    for j in range(bits):
        codes |= ((planes[j].unsqueeze(-1) >> _SHIFTS) & 1).reshape(-1) << j
    return codes[:n].reshape(shape)


# --- the file -----------------------------------------------------------------------------


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_version(header: dict) -> int:
    """The oldest format version whose readers read every layer of ``header`` right, so that an
    older distq refuses a file it would misread and still reads the files it can."""
    from distq.quant.methods import method_class, method_keys

    methods = {record["method"] for record in header.get("layers", {}).values() if "method" in record}
    return max([1] + [method_class(m).export_version for m in methods if m in method_keys()])


def to_bytes(export: ExportFile) -> bytes:
    from safetensors.torch import save

    header = {**export.header, "format": FORMAT, "version": file_version(export.header), "sha256": tensor_digest(export.tensors)}
    tensors = {name: t.contiguous() for name, t in export.tensors.items()}
    return save(tensors, metadata={METADATA_KEY: json.dumps(header)})


def write_export(export: ExportFile, path: str | Path) -> int:
    """Write ``export`` atomically to ``path``; returns the file size in bytes."""
    data = to_bytes(export)
    write_file(path, data)
    return len(data)


def check_writable(path: str | Path, overwrite: bool = True) -> None:
    """Refuse an output path that cannot be written, before any work is done for it: a folder,
    a place inside a run's checkpoints (always), an existing file (unless ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: it is a directory; give the name of the file to write")
    _refuse_checkpoint_folder(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise ExportError(f"{str(path)!r} already exists: pass --force to replace it, or choose another --out")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the writer creates missing folders below the nearest existing one
    if not folder.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {str(path)!r}: no permission to write in {str(folder)!r}")


def write_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path``; an OS refusal is an ``ExportError`` naming the file."""
    from distq.checkpoint import atomic_write

    _refuse_checkpoint_folder(Path(path))
    try:
        atomic_write(Path(path), lambda f: f.write(data))
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def _refuse_checkpoint_folder(path: Path) -> None:
    """An export never goes among a run's checkpoints: it would replace one, or be taken for one."""
    from distq.checkpoint.store import enclosing_checkpoints

    folder = enclosing_checkpoints(path)
    if folder is not None:
        raise ExportError(
            f"refusing to write {str(path)!r}: it is inside {str(folder)!r}, a training run's checkpoints, which an export "
            "must not replace or mix with (--force does not change this); write it elsewhere, e.g. RUN_DIR/model.safetensors"
        )


def not_a_file(path: Path, what: str, write_hint: str) -> ExportError:
    """The error for an export path that is not a readable file: missing, a folder (a training
    run's, perhaps), or something else."""
    from distq.checkpoint.store import holds_checkpoints

    if path.is_dir():
        if holds_checkpoints(path):
            return ExportError(
                f"{what} is a directory holding a training checkpoint, not an export file: evaluate it with "
                f"'distq eval {path}' (no --engine), or export it first with 'distq export {path} --out FILE'"
            )
        return ExportError(f"{what} is a directory, not an export file: give the path of a file written by 'distq export'")
    if path.exists():
        return ExportError(f"{what} is not a regular file: give the path of a file written by 'distq export'")
    return ExportError(f"{what} not found: {write_hint}")


def read_export(path: str | Path) -> ExportFile:
    """Read and validate an export file; every problem is an ``ExportError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path, f"export file {str(path)!r}", "write one with 'distq export CHECKPOINT --out FILE'")
    return from_bytes(path.read_bytes(), str(path))


def from_bytes(data: bytes, source: str = "<bytes>") -> ExportFile:
    what = f"export file {source!r}"
    header_json, data_start = _safetensors_header(data, what)
    meta = header_json.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise ExportError(
            f"{what} is not a distq export (a safetensors file without a distq header): write one with 'distq export'"
        )
    try:
        header = json.loads(meta[METADATA_KEY])
    except (TypeError, json.JSONDecodeError):
        raise ExportError(f"{what} is corrupt: its distq header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ExportError(f"{what} is not a distq export (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"{what} is corrupt: format version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{what} has format version {version}, newer than this distq reads ({FORMAT_VERSION}): upgrade distq to load it"
        )
    end = max((v["data_offsets"][1] for k, v in header_json.items() if k != "__metadata__"), default=0)
    if len(data) - data_start < end:
        raise ExportError(f"{what} is truncated: its tensors need {data_start + end} bytes but the file has {len(data)}")
    try:
        from safetensors.torch import load

        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others for bad bytes
        raise ExportError(f"{what} is corrupt: safetensors cannot read its tensors ({str(exc).splitlines()[0]})") from None
    if tensor_digest(tensors) != header.get("sha256"):
        raise ExportError(f"{what} is corrupt: its tensor data does not match the checksum in its header")
    check_finite(tensors, what)
    return ExportFile(header=header, tensors=tensors)


def check_finite(tensors: dict, what: str) -> None:
    """ExportError if a float tensor of an export holds NaN or infinite values (a diverged model)."""
    from distq.checkpoint.finite import nonfinite_entries

    bad = nonfinite_entries(tensors)
    if bad:
        raise nonfinite_export(what, bad)


def nonfinite_export(what: str, names: list[str]) -> ExportError:
    """The error for an export (of any format) whose tensors ``names`` hold NaN or infinite values."""
    from distq.checkpoint.finite import describe_nonfinite

    return ExportError(
        f"{what} cannot be used: {describe_nonfinite(names)}: the model it was exported from diverged; export an "
        "earlier checkpoint (RUN_DIR/checkpoints/step_*), or train again with a lower train.lr"
    )


def _safetensors_header(data: bytes, what: str) -> tuple[dict, int]:
    """Parse the safetensors JSON header ourselves, to say precisely what is wrong."""
    if len(data) < 8:
        raise ExportError(f"{what} is truncated or not a distq export: {len(data)} bytes, shorter than a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ExportError(
            f"{what} is truncated or not a distq export: its header claims {size} bytes but the file has {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExportError(f"{what} is corrupt or not a distq export: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
        for k, v in header.items()
        if k != "__metadata__"
    ):
        raise ExportError(f"{what} is corrupt or not a distq export: its safetensors header is malformed")
    return header, 8 + size
