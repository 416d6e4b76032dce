"""Stage results as safetensors bytes: nested values in, exact values out.

A payload is any nesting of dicts (string keys), lists, tuples, arrays, numbers, strings,
booleans and None: a diffusers ``prompt_embeds``, a ComfyUI LATENT or CONDITIONING, the
prepared images. Arrays go into the safetensors body under generated keys; the structure goes
as JSON into the metadata header (``qie.skeleton``) with each array replaced by
``{"$tensor": key}``. Nothing is pickled.

Arrays are torch tensors or NumPy arrays; a payload holds one kind (``qie.tensors`` in the
header says which) and comes back as the same kind, so a payload without torch tensors is
stored and read without importing torch. Writing the bytes to disk is the processor's business
(``processor/files.py``); this module only encodes and decodes.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import numpy as np
from safetensors import SafetensorError

SKELETON_KEY = "qie.skeleton"
KIND_KEY = "qie.tensors"
Payload = Any


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated, corrupt or not what was recorded."""


def _is_torch(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def flatten(payload: Payload) -> tuple[dict[str, Any], Any, str]:
    """Split a payload into named arrays, a JSON-able skeleton and the arrays' kind."""
    arrays: dict[str, Any] = {}
    kinds: set[str] = set()

    def walk(value: Any) -> Any:
        if _is_torch(value):
            key = f"t{len(arrays)}"
            arrays[key] = value.detach().to("cpu").contiguous()
            kinds.add("torch")
            return {"$tensor": key}
        if isinstance(value, np.ndarray):
            key = f"t{len(arrays)}"
            arrays[key] = np.ascontiguousarray(value)
            kinds.add("numpy")
            return {"$tensor": key}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError("payload dict keys must be strings")
            return {"$dict": {k: walk(v) for k, v in value.items()}}
        if isinstance(value, tuple):
            return {"$tuple": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a value of type {type(value).__name__}")

    skeleton = walk(payload)
    if len(kinds) > 1:
        import torch
        arrays = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    kind = "torch" if "torch" in kinds else "numpy"
    return arrays, skeleton, kind


def unflatten(arrays: dict[str, Any], skeleton: Any) -> Payload:
    """Rebuild the payload that ``flatten`` split."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$tensor" in node:
                return arrays[node["$tensor"]]
            if "$tuple" in node:
                return tuple(walk(v) for v in node["$tuple"])
            return {k: walk(v) for k, v in node["$dict"].items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def encode(payload: Payload, metadata: Optional[dict[str, str]] = None) -> bytes:
    """The safetensors bytes of a payload."""
    arrays, skeleton, kind = flatten(payload)
    header = dict(metadata or {})
    header[SKELETON_KEY] = json.dumps(skeleton, separators=(",", ":"))
    header[KIND_KEY] = kind
    if kind == "torch":
        from safetensors.torch import save
        return save(arrays, metadata=header)
    from safetensors.numpy import save
    return save(arrays, metadata=header)


def header_of(data: bytes) -> dict[str, Any]:
    """The safetensors header (the JSON after the 8-byte length)."""
    length = int.from_bytes(data[:8], "little")
    if length <= 0 or length > len(data) - 8:
        raise ValueError("bad header length")
    return json.loads(data[8:8 + length])


def decode(data: bytes, origin: str = "<bytes>") -> Payload:
    """The payload of safetensors bytes written by ``encode`` (arrays of the kind written;
    files without a kind are from versions that wrote only torch tensors)."""
    try:
        metadata = header_of(data)["__metadata__"]
        skeleton = json.loads(metadata[SKELETON_KEY])
        if metadata.get(KIND_KEY, "torch") == "numpy":
            from safetensors.numpy import load
        else:
            from safetensors.torch import load
        arrays = load(data)
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{origin}: not a readable checkpoint ({exc})") from exc
    return unflatten(arrays, skeleton)
