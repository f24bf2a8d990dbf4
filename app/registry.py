"""The models the service serves, by name, and their swaps to new weights without downtime.

Each model has a name, a source (a checkpoint file or published weights by name), and the
copy now loaded from it: a ``Detector``, its version, and a ``Batcher`` of its own. All models
share the decode pool and its pixel budget (``app.images``); each has its own inference
thread, which its successive copies share.

A reload loads the source again beside the copy that is serving, warms the new copy up, and
switches between batches: requests admitted from then on go to the new copy, while those
already admitted to the old one finish there; the old copy's batcher then stops and the copy
is freed. A source that fails to load or to warm up leaves the old copy serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.batcher import Batcher
from app.errors import ReloadFailedError, UnknownModelError
from app.metrics import Metrics, ModelMetrics
from app.schemas import ModelRef
from model.network.detections import ServedDetector
from model.weights.sources import file_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    """How each model's batcher forms batches (see ``app.batcher.Batcher``)."""

    max_batch_size: int
    max_wait_s: float
    max_queue: int


@dataclass(frozen=True)
class Copy:
    """One loaded copy of a model: what answers a request admitted to it."""

    ref: ModelRef
    detector: ServedDetector
    batcher: Batcher


class _Slot:
    """A model's name and source, the copy serving now, and what its copies share."""

    def __init__(self, name: str, source: Path, metrics: ModelMetrics) -> None:
        self.name = name
        self.source = source
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-inference")
        self.current: Copy | None = None
        # Every copy's detector while anything holds it: what ``ssd_model_copies`` counts.
        self.loaded: weakref.WeakSet[ServedDetector] = weakref.WeakSet()
        self.lock = asyncio.Lock()  # one load at a time per model

    def copies(self) -> float:
        """Copies of this model in memory (``ssd_model_copies``)."""
        return len(self.loaded)

    def queue_depth(self) -> float:
        """Images waiting for the copy serving now."""
        return self.current.batcher.queue_depth if self.current is not None else 0


class Registry:
    """The served models, by name.

    Args:
        sources: model name to source, the default model's among them.
        default: the name of the model a request gets when it names none.
        load: loads a source into a ``Detector`` (runs on a worker thread); raises with a
            message naming what is wrong.
        metrics: where each model's series go (``model`` label).
        limits: each model's batching.
        preloaded: copies already loaded, by name, used instead of loading at ``start``.
        version: a source's version (``model.weights.published.weights_version`` for the
            torch backend, which also names published weights); default: the file's sha256
            prefix.
    """

    def __init__(
        self,
        sources: Mapping[str, Path],
        default: str,
        load: Callable[[Path], ServedDetector],
        metrics: Metrics,
        limits: BatchLimits,
        preloaded: Mapping[str, ServedDetector] | None = None,
        version: Callable[[Path], str] = file_version,
    ) -> None:
        if default not in sources:
            raise ValueError(f"the default model {default!r} is not among {sorted(sources)}")
        self.default = default
        self._load_source = load
        self._version = version
        self._limits = limits
        self._preloaded = dict(preloaded or {})
        # Every load on one thread: the copies then come from one malloc arena, where a freed
        # copy's memory is reused by the next load rather than left in an arena of its own.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-load")
        self._slots = {
            name: _Slot(name, source, metrics.for_model(name)) for name, source in sources.items()
        }
        for slot in self._slots.values():
            slot.metrics.queue_capacity.set(limits.max_queue)
            slot.metrics.queue_depth.set_function(slot.queue_depth)
            slot.metrics.copies.set_function(slot.copies)

    @property
    def names(self) -> list[str]:
        """The model names, the default first."""
        return [self.default, *(name for name in self._slots if name != self.default)]

    def get(self, name: str | None = None) -> Copy:
        """The copy serving model ``name`` now (the default model for None).

        Raises:
            UnknownModelError: no model has that name; the message lists the names.
        """
        slot = self._slot(name or self.default)
        assert slot.current is not None, "Registry.start has not run"
        return slot.current

    def describe(self) -> list[str]:
        """One line per model: its name, version, device and precision (for the log)."""
        lines = []
        for name in self.names:
            copy = self.get(name)
            detector = copy.detector
            lines.append(f"{name} {copy.ref.version} on {detector.device} in {detector.precision}")
        return lines

    async def start(self) -> None:
        """Load (or take the preloaded copy of) every model, warm each up, start its batcher.

        Raises:
            whatever ``load`` raises for the first model that cannot be loaded.
        """
        for slot in self._slots.values():
            slot.current = await self._load(slot, self._preloaded.pop(slot.name, None))
            self._serving(slot)

    async def reload(self, name: str) -> ModelRef:
        """Load model ``name``'s source again beside the copy serving, warm it up, switch to
        it between batches, let the old copy finish what was admitted to it, and free it.

        Raises:
            UnknownModelError: no model has that name.
            ReloadFailedError: the source failed to load or warm up (the message says why);
                the old copy goes on serving.
        """
        slot = self._slot(name)
        async with slot.lock:
            old = slot.current
            assert old is not None, "Registry.start has not run"
            try:
                new = await self._load(slot)
            except Exception as exc:
                slot.metrics.reloaded(ok=False)
                log.error("reloading model %r from %s failed: %s", name, slot.source, exc)
                raise ReloadFailedError(
                    f"model {name!r} could not be reloaded from {slot.source}, so version "
                    f"{old.ref.version} goes on serving: {exc}"
                ) from None
            slot.current = new
            self._serving(slot)
            await old.batcher.stop()  # what was admitted to the old copy finishes there
            del old
            gc.collect()  # the copy's tensors go now, not at some later collection
            slot.metrics.reloaded(ok=True)
            log.info("model %r now serves version %s", name, new.ref.version)
            return new.ref

    async def reload_all(self) -> None:
        """Reload every model in turn (SIGHUP); a failure is logged and leaves that model's
        copy serving."""
        for name in self.names:
            with contextlib.suppress(ReloadFailedError):  # logged by reload
                await self.reload(name)

    async def stop(self) -> None:
        """Run what each model has queued, then stop the batchers and threads."""
        for slot in self._slots.values():
            if slot.current is not None:
                await slot.current.batcher.stop()
            await asyncio.to_thread(slot.executor.shutdown, wait=True)
        await asyncio.to_thread(self._loader.shutdown, wait=True)

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise UnknownModelError(
                f"no model is named {name!r}; this server has {', '.join(self.names)}"
            ) from None

    async def _load(self, slot: _Slot, detector: ServedDetector | None = None) -> Copy:
        """A new copy of ``slot``'s model, warmed up, its batcher started."""
        loop = asyncio.get_running_loop()
        if detector is None:
            detector, version = await loop.run_in_executor(self._loader, self._read, slot.source)
        else:
            version = await loop.run_in_executor(self._loader, self._version, slot.source)
        slot.loaded.add(detector)
        limits = self._limits
        batcher = Batcher(
            detector,
            slot.metrics,
            slot.executor,
            max_batch_size=limits.max_batch_size,
            max_wait_s=limits.max_wait_s,
            max_queue=limits.max_queue,
        )
        await batcher.warm_up()
        await batcher.start()
        return Copy(ModelRef(name=slot.name, version=version), detector, batcher)

    def _read(self, source: Path) -> tuple[ServedDetector, str]:
        """Load ``source`` and its version, checking that the file did not change meanwhile
        (a file being replaced by a copy or a training run)."""
        try:
            before: str | None = self._version(source)
        except OSError:
            before = None  # no such file: the loader says so, naming the setting
        detector = self._load_source(source)
        after = self._version(source)
        if before != after:
            raise ValueError(
                f"{source} changed while it was being loaded (version {before}, then {after}); "
                "replace it in one step (write elsewhere, then rename) and reload again"
            )
        return detector, before

    @staticmethod
    def _serving(slot: _Slot) -> None:
        copy = slot.current
        assert copy is not None
        detector = copy.detector
        slot.metrics.serving(copy.ref.version, str(detector.device), detector.precision)
