"""Checkpoints: durable files, manifests that commit them, engine-independent optimizer state."""

from distq.checkpoint.files import FileRecord, atomic_write, load_tensors, save_tensors
from distq.checkpoint.manifest import FORMAT_VERSION, CheckpointError, Manifest
from distq.checkpoint.store import CheckpointStore, Found, checkpoint_dir, load_state, optimizer_file, tag_for
from distq.checkpoint.weights import load_weights

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointStore",
    "FileRecord",
    "Found",
    "Manifest",
    "atomic_write",
    "checkpoint_dir",
    "load_state",
    "load_tensors",
    "load_weights",
    "optimizer_file",
    "save_tensors",
    "tag_for",
]
