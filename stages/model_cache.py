"""One process-wide cache of loaded models, shared by every stage and job.

Load once, reuse across jobs, evict the least recently used model when a memory budget would
be exceeded. Loads, unloads and the time spent loading are counted so that tests and
benchmarks can check "each model loaded once for the whole batch".
"""

from __future__ import annotations

import gc
import os
import sys
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

log = logging.getLogger(__name__)


def model_bytes(model: Any) -> int:
    """Memory held by a model's parameters and buffers (or its ``nbytes``; 0 for objects that
    have neither)."""
    if isinstance(getattr(model, "nbytes", None), int):
        return model.nbytes
    total = 0
    for attr in ("parameters", "buffers"):
        method = getattr(model, attr, None)
        if callable(method):
            try:
                total += sum(t.numel() * t.element_size() for t in method())
            except TypeError:
                pass
    return total


@dataclass
class CacheStats:
    loads: Counter = field(default_factory=Counter)
    unloads: Counter = field(default_factory=Counter)
    load_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"loads": dict(self.loads), "unloads": dict(self.unloads),
                "load_seconds": round(self.load_seconds, 3)}


class ModelCache:
    """LRU cache of loaded models keyed by an identity that includes everything that shapes them."""

    def __init__(self, budget_bytes: Optional[int] = None,
                 measure: Callable[[Any], int] = model_bytes,
                 on_load: Optional[Callable[[str], None]] = None, load_delay: float = 0.0):
        self.budget_bytes = budget_bytes
        self.load_delay = load_delay  # seconds added to every load, to imitate real model sizes
        self._measure = measure
        self._entries: "OrderedDict[Hashable, tuple[Any, int, str]]" = OrderedDict()
        self._lock = threading.RLock()
        self._on_load = on_load
        self._sizes: dict[str, int] = {}  # role -> size when last loaded
        self.stats = CacheStats()

    def get(self, key: Hashable, load: Callable[[], Any], role: str, expected_bytes: Optional[int] = None) -> Any:
        """The model for ``key``, loading it with ``load()`` when absent. ``role`` names it in counts.
        ``expected_bytes``: an estimate of its size, to evict for before loading it (a device
        cannot hold the old and the new model at once)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            if expected_bytes is not None:
                self._make_room(expected_bytes)
            if self._on_load is not None:
                self._on_load(role)
            started = time.perf_counter()
            model = load()
            if self.load_delay:
                time.sleep(self.load_delay)
            elapsed = time.perf_counter() - started
            size = self._measure(model)
            self.stats.loads[role] += 1
            self._sizes[role] = size
            self.stats.load_seconds += elapsed
            log.info("loaded %s in %.2fs (%.1f MB)", role, elapsed, size / 1e6)
            self._make_room(size)
            self._entries[key] = (model, size, role)
            return model

    def loaded(self) -> list[str]:
        with self._lock:
            return [role for _, _, role in self._entries.values()]

    def sizes(self) -> dict[str, int]:
        """Bytes held by each loaded model, by role."""
        with self._lock:
            return {role: size for _, size, role in self._entries.values()}

    def known_sizes(self) -> dict[str, int]:
        """The size of each role's model when it was last loaded (loaded now or not)."""
        with self._lock:
            return dict(self._sizes)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size, _ in self._entries.values())

    def _make_room(self, incoming: int) -> None:
        if self.budget_bytes is None:
            return
        while self._entries and self.resident_bytes() + incoming > self.budget_bytes:
            key, (_, size, role) = next(iter(self._entries.items()))
            self.evict(key)

    def evict(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.stats.unloads[entry[2]] += 1
        log.info("unloaded %s (%.1f MB)", entry[2], entry[1] / 1e6)
        del entry
        gc.collect()
        _empty_device_cache()

    def clear(self) -> None:
        for key in list(self._entries):
            self.evict(key)


def memory_budget(device: str, share: float = 0.9) -> int:
    """A default budget: ``share`` of the GPU's memory on CUDA, of physical RAM on the CPU."""
    if device != "cpu":
        try:
            import torch
            if torch.cuda.is_available():
                index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
                return int(torch.cuda.get_device_properties(index).total_memory * share)
        except ImportError:
            pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * share)


def _empty_device_cache() -> None:
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
