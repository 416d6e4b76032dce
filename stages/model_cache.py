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
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Optional

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
        self._loading: dict[Hashable, threading.Event] = {}  # keys being loaded, set when done
        self._local = threading.local()
        self._load_lock = threading.Lock()
        self.stats = CacheStats()

    @contextmanager
    def prefetching(self, estimates: Optional[dict[str, int]] = None) -> Iterator[None]:
        """Loads requested inside (in this thread) are prefetches (see ``get``); ``estimates``:
        each role's size for a model never loaded yet (a model of unknown size is not prefetched)."""
        self._local.prefetch = True
        self._local.estimates = estimates or {}
        try:
            yield
        finally:
            self._local.prefetch = False
            self._local.estimates = {}

    def get(self, key: Hashable, load: Callable[[], Any], role: str, prefetch: bool = False,
            expected_bytes: Optional[int] = None) -> Any:
        """The model for ``key``, loading it with ``load()`` when absent. ``role`` names it in counts.

        A load happens outside the cache's lock (another thread may use a loaded model
        meanwhile); a second request for the same key waits for the first load. Room is made
        before loading when the role's size is known from an earlier load, so the device never
        holds the old and the new model at once; ``expected_bytes``, an estimate, stands in for a
        size not known yet. ``prefetch``: loaded ahead of its use, only if it fits beside what is
        loaded (nothing is evicted for it; None when it does not fit)."""
        prefetch = prefetch or getattr(self._local, "prefetch", False)
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key][0]
                pending = self._loading.get(key)
                if pending is None:
                    estimate = expected_bytes or getattr(self._local, "estimates", {}).get(role, 0)
                    expected = self._sizes.get(role, estimate)
                    if prefetch and (role not in self._sizes and not expected or not self._fits(expected)):
                        return None
                    if not prefetch:
                        self._make_room(expected)
                    pending = self._loading[key] = threading.Event()
                    break
            pending.wait()
        try:
            model = self._load(load, role)
            size = self._measure(model)
            with self._lock:
                self._sizes[role] = size
                if prefetch and not self._fits(size):
                    log.info("prefetched %s does not fit beside the loaded models; dropped", role)
                    return None
                self._make_room(size)
                self._entries[key] = (model, size, role)
            return model
        finally:
            with self._lock:
                self._loading.pop(key, None)
            pending.set()

    def _load(self, load: Callable[[], Any], role: str) -> Any:
        if self._on_load is not None:
            self._on_load(role)
        started = time.perf_counter()
        # One load at a time, whichever thread asks: loaders are not thread-safe (accelerate's
        # empty-weights initialisation patches torch's modules for the whole process meanwhile).
        with self._load_lock:
            model = load()
        if self.load_delay:
            time.sleep(self.load_delay)
        elapsed = time.perf_counter() - started
        self._local.load_seconds = self.thread_load_seconds() + elapsed
        with self._lock:
            self.stats.loads[role] += 1
            self.stats.load_seconds += elapsed
        log.info("loaded %s in %.2fs", role, elapsed)
        return model

    def thread_load_seconds(self) -> float:
        """Seconds the calling thread has spent loading models (to tell a stage's own time from
        the loads it waited for)."""
        return getattr(self._local, "load_seconds", 0.0)

    def _fits(self, incoming: int) -> bool:
        return self.budget_bytes is None or self.resident_bytes() + incoming <= self.budget_bytes

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
