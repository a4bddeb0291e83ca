"""The export file format: bit-plane packing, the header round trip, and every way a file
can be broken, each rejected with a message that says what is wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distq.export.format import (
    FORMAT_VERSION,
    METADATA_KEY,
    ExportError,
    ExportFile,
    from_bytes,
    pack_planes,
    read_export,
    to_bytes,
    unpack_planes,
    write_export,
)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_planes_round_trips_at_bits_over_8_bytes_per_plane(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_planes(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (bits, -(-n // 8))  # k bits per code, 8 codes per byte
    assert torch.equal(unpack_planes(packed, bits, (n,)).long(), codes)


def test_pack_planes_layout_is_bit_j_of_code_8b_plus_i():
    codes = torch.tensor([0b01, 0b10, 0b11, 0, 0, 0, 0, 0, 0b11])  # 9 two-bit codes
    packed = pack_planes(codes, 2)
    assert packed.tolist() == [[0b00000101, 0b1], [0b00000110, 0b1]]


def test_pack_planes_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="out of range"):
        pack_planes(torch.tensor([4]), 2)


def _sample() -> ExportFile:
    header = {"model": {"arch": "resnet18"}, "classes": ["a", "b"], "layers": {}}
    tensors = {"w.weight_codes": pack_planes(torch.arange(16) % 4, 2), "w.out_scale": torch.linspace(0.5, 1.5, 8)}
    return ExportFile(header, tensors)


@pytest.fixture
def sample_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_export(_sample(), path)
    return path


def test_round_trip_keeps_header_and_tensors(sample_file):
    loaded = read_export(sample_file)
    assert loaded.header["version"] == 1  # no layer needs a newer reader (file_version)
    assert loaded.header["classes"] == ["a", "b"]
    for name, tensor in _sample().tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)


def test_the_file_is_plain_safetensors(sample_file):
    from safetensors import safe_open

    with safe_open(str(sample_file), "pt") as f:
        assert sorted(f.keys()) == sorted(_sample().tensors)
        assert json.loads(f.metadata()[METADATA_KEY])["format"] == "distq.export"


def _rewrite_header(data: bytes, edit) -> bytes:
    """Re-encode the distq header of a valid file after ``edit(header)``."""
    (size,) = struct.unpack("<Q", data[:8])
    outer = json.loads(data[8 : 8 + size])
    header = json.loads(outer["__metadata__"][METADATA_KEY])
    edit(header)
    outer["__metadata__"][METADATA_KEY] = json.dumps(header)
    new = json.dumps(outer).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + size :]


def _expect(data: bytes, tmp_path, *fragments: str) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data)
    with pytest.raises(ExportError) as info:
        read_export(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ExportError, match=r"not found: write one with 'distq export"):
        read_export(tmp_path / "nope.safetensors")


def test_truncated_tensor_data_is_rejected(sample_file, tmp_path):
    data = sample_file.read_bytes()
    _expect(data[:-5], tmp_path, "is truncated", f"the file has {len(data) - 5}")


def test_truncated_header_is_rejected(sample_file, tmp_path):
    _expect(sample_file.read_bytes()[:40], tmp_path, "is truncated or not a distq export")
    _expect(sample_file.read_bytes()[:5], tmp_path, "shorter than a safetensors header")


def test_flipped_data_byte_fails_the_checksum(sample_file, tmp_path):
    data = bytearray(sample_file.read_bytes())
    data[-3] ^= 0x10
    _expect(bytes(data), tmp_path, "is corrupt", "checksum")


def test_garbled_header_is_corrupt(sample_file, tmp_path):
    data = bytearray(sample_file.read_bytes())
    data[9] = ord("#")
    _expect(bytes(data), tmp_path, "is corrupt", "not valid JSON")


def test_newer_format_version_asks_for_an_upgrade(sample_file, tmp_path):
    data = _rewrite_header(sample_file.read_bytes(), lambda h: h.update(version=FORMAT_VERSION + 1))
    _expect(
        data, tmp_path, f"format version {FORMAT_VERSION + 1}", f"newer than this distq reads ({FORMAT_VERSION})", "upgrade distq"
    )


def test_bad_version_is_corrupt(sample_file, tmp_path):
    data = _rewrite_header(sample_file.read_bytes(), lambda h: h.update(version="one"))
    _expect(data, tmp_path, "is corrupt", "format version 'one'")


def test_other_safetensors_files_are_not_distq_exports(tmp_path):
    from safetensors.torch import save

    _expect(save({"w": torch.zeros(3)}), tmp_path, "is not a distq export")
    _expect(b"\x00" * 64, tmp_path, "not a distq export")


def test_header_names_a_missing_tensor(sample_file):
    loaded = read_export(sample_file)
    with pytest.raises(ExportError, match="tensor 'nope' named by its header is missing"):
        loaded.tensor("nope")


def test_unpack_checks_the_packed_shape():
    with pytest.raises(ExportError, match=r"expected \(2, 2\) uint8"):
        unpack_planes(torch.zeros(2, 3, dtype=torch.uint8), 2, (4, 4))


def test_to_bytes_and_from_bytes_agree():
    export = _sample()
    assert from_bytes(to_bytes(export)).header["layers"] == {}


def test_a_file_says_the_oldest_format_that_reads_it_right():
    """Format 1 readers know DoReFa and AQE integers only: a file with an LSQ or PACT layer is
    version 2 (so they refuse it instead of misreading it), any other stays version 1."""
    from distq.export.format import FORMAT_VERSION, file_version

    def header(*methods):
        return {"layers": {f"l{i}": {"op": "act", "bits": 4, "method": m} for i, m in enumerate(methods)}}

    assert file_version(header("relu", "dorefa", "aqe")) == 1
    assert file_version(header("dorefa", "lsq")) == file_version(header("pact")) == 2 == FORMAT_VERSION
