"""Stage results as safetensors files: nested values in, exact values out.

A payload is any nesting of dicts (string keys), lists, tuples, tensors, numbers, strings,
booleans and None: a diffusers ``prompt_embeds``, a ComfyUI LATENT or CONDITIONING. Tensors go
into the safetensors body under generated keys; the structure goes as JSON into the metadata
header (``qie.skeleton``) with each tensor replaced by ``{"$tensor": key}``. Nothing is pickled.

Files are written atomically (temp file in the same folder, fsync, rename, fsync the folder),
and their sha256 is returned so that the caller can record it and check it before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

SKELETON_KEY = "qie.skeleton"
Payload = Any


class CheckpointError(Exception):
    """A checkpoint file that is missing, truncated, corrupt or not what was recorded."""


def flatten(payload: Payload) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a payload into named tensors and a JSON-able skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu").contiguous()
            return {"$tensor": key}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError("payload dict keys must be strings")
            return {"$dict": {k: walk(v) for k, v in value.items()}}
        if isinstance(value, tuple):
            return {"$tuple": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a value of type {type(value).__name__}")

    return tensors, walk(payload)


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Payload:
    """Rebuild the payload that ``flatten`` split."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$tensor" in node:
                return tensors[node["$tensor"]]
            if "$tuple" in node:
                return tuple(walk(v) for v in node["$tuple"])
            return {k: walk(v) for k, v in node["$dict"].items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def encode(payload: Payload, metadata: Optional[dict[str, str]] = None) -> bytes:
    """The safetensors bytes of a payload."""
    tensors, skeleton = flatten(payload)
    header = dict(metadata or {})
    header[SKELETON_KEY] = json.dumps(skeleton, separators=(",", ":"))
    return save_bytes(tensors, metadata=header)


def decode(data: bytes, origin: str = "<bytes>") -> Payload:
    """The payload of safetensors bytes written by ``encode``."""
    try:
        tensors = load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        skeleton = json.loads(header["__metadata__"][SKELETON_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{origin}: not a readable checkpoint ({exc})") from exc
    return unflatten(tensors, skeleton)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, before_rename: Optional[Callable[[], None]] = None,
                 shared: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``shared``: other processes may write the same path at once, so the temporary name is made
    unique; otherwise it is ``.<name>.tmp``, and a retry after a crash overwrites its leftover.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, payload: Payload, metadata: Optional[dict[str, str]] = None,
         before_rename: Optional[Callable[[], None]] = None) -> str:
    """Write a payload checkpoint atomically; return its sha256."""
    data = encode(payload, metadata)
    write_atomic(path, data, before_rename)
    return sha256_bytes(data)


def load(path: Path, expected_sha256: str) -> Payload:
    """Read a checkpoint, refusing it unless its sha256 is the recorded one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise CheckpointError(f"{path}: sha256 {actual[:12]} is not the recorded {expected_sha256[:12]}")
    return decode(data, str(path))
