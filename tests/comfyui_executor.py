"""Running a graph through ComfyUI's own executor, in this process (test code only).

ComfyUI's server hands each queued prompt to ``execution.PromptExecutor``; this does the same
without the web server: ``validate_prompt`` checks the graph (node types, inputs, model file
names, ranges), the executor runs it with ComfyUI's own node execution and caching, and its
SaveImage writes the PNG into the output folder given here. ComfyUI must be booted already
(the engine does it) with the tiny-model patches installed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image


class _Headless:
    """The little of ComfyUI's PromptServer the executor talks to: no client, messages dropped."""

    client_id = None
    last_node_id = None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        return None


def execute(graph: Mapping[str, Any], images: Mapping[str, Path], folder: Path) -> Path:
    """Run API graph ``graph`` with ComfyUI's executor. ``images``: the files its LoadImage nodes
    name, copied into a fresh input folder under ``folder``; returns the PNG SaveImage wrote."""
    import execution
    import folder_paths

    inputs, outputs = folder / "input", folder / "output"
    inputs.mkdir(parents=True, exist_ok=True)
    outputs.mkdir(parents=True, exist_ok=True)
    for name, path in images.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, inputs / name)
    previous = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(inputs))
    folder_paths.set_output_directory(str(outputs))
    try:
        prompt = json.loads(json.dumps(graph))  # as it would arrive over the API
        prompt_id = str(uuid.uuid4())
        valid, error, output_nodes, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise AssertionError(f"ComfyUI refused the graph: {error} {node_errors}")
        executor = execution.PromptExecutor(_Headless(), cache_type=execution.CacheType.CLASSIC)
        executor.execute(prompt, prompt_id, {}, output_nodes)
        if not executor.success:
            messages = [m for m in executor.status_messages if m[0] == "execution_error"]
            raise AssertionError(f"ComfyUI's executor failed: {messages}")
    finally:
        folder_paths.set_input_directory(previous[0])
        folder_paths.set_output_directory(previous[1])
    saved = sorted(outputs.glob("*.png"))
    if len(saved) != 1:
        raise AssertionError(f"expected one saved PNG in {outputs}, found {saved}")
    return saved[0]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def text_chunks(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        image.load()
        return dict(image.text)
