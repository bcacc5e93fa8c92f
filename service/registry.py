"""The models a server serves and their versions: discovery in the models directory, loading, validation, warm-up,
one batcher per version, and changes at run time (reload, load, unload) that neither drop nor cross a request.

Layout (docs/models.md): models_dir/NAME/ is one model. Either it is a checkpoint directory itself (the flat layout:
one version, named "1"), or each of its sub-directories that is one is a version (NAME/VERSION/). NAME/versions.json
may pin the default version, `{"default": "VERSION"}`; without it the default is the newest: the greatest version
name in natural order (runs of digits compare as numbers: 9 < 10, v2 < v10, 2024-06-09 < 2024-06-10).

A request resolves its model and version once, `acquire("NAME" | "NAME@VERSION" | None)`, and holds that version
(its predictor and batcher) until it calls `release`. A change loads the new versions beside the old ones (sha256
check, config check, finite outputs, warm-up), publishes the new routing table in one assignment, and only then
retires the versions that left: no longer routed to, they finish the requests holding them, then their batchers
stop. A failed change publishes nothing. Changes to one model hold its asyncio.Lock, so they run one at a time.

The Open Inference Protocol's repository extension maps onto `index` (/v2/repository/index), `load` and `unload`
(/v2/repository/models/{m}/load, /unload); its routes acquire and release versions as /v1's `answer` does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import checkpoint
from model.device import resolve_device
from service import memory
from service.arrivals import Linger, NewestTask
from service.batching import BatchObserver, MicroBatcher
from service.errors import InvalidModelFolder, ModelNotFound, ModelNotReady, ServiceError, StartupError
from service.predictor import MERGEABLE_OPS, VAEPredictor
from service.settings import Settings

logger = logging.getLogger("vae_serve")

FLAT_VERSION = "1"  # the one version of a flat model folder
VERSIONS_FILE = "versions.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # model and version names: no "@" (the separator), no "/"
DRAIN_MARGIN_S = 5.0  # a retired version waits request_timeout_s plus this for the requests still holding it
Fingerprint = tuple[tuple[str, int, int], ...]


# -- the models directory --------------------------------------------------------------------------------------------
def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of version names: runs of digits compare as numbers, the rest as text (9 < 10, v2 < v10)."""
    return tuple((0, int(run)) if run.isdigit() else (1, run) for run in re.findall(r"\d+|\D+", name))


def version_dirs(folder: Path) -> list[Path]:
    """The sub-directories of `folder` holding a checkpoint, oldest version first (dot-directories are skipped:
    copy a new version in under a dot-name, then rename it)."""
    subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((p for p in subs if (p / checkpoint.CARD_FILE).is_file()), key=lambda p: natural_key(p.name))


def is_model_folder(path: Path) -> bool:
    """A checkpoint directory (flat layout), or a folder with at least one version directory."""
    try:
        return path.is_dir() and ((path / checkpoint.CARD_FILE).is_file() or bool(version_dirs(path)))
    except OSError:
        return False


def model_folders(root: Path) -> list[Path]:
    try:
        return [path for path in sorted(root.iterdir()) if is_model_folder(path)]
    except OSError:
        return []


def discover(settings: Settings) -> dict[str, Path]:
    """Model name -> model folder. A model's name is its folder's name (what `?model=` takes; the card's own `name`
    is only shown in its card). Raises StartupError with one clear line."""
    root = settings.models_dir.expanduser()
    found: dict[str, Path] = {}
    if settings.models:
        for entry in settings.models:
            as_path = Path(entry).expanduser()
            path = as_path if (os.sep in entry or as_path.is_absolute()) else root / entry
            name = path.resolve().name
            if name in found:
                raise StartupError(f"two models are named {name!r}: {found[name]} and {path}")
            if not is_model_folder(path):
                raise StartupError(
                    f"model {entry!r}: {path.resolve()} is not a checkpoint directory (no {checkpoint.CARD_FILE}, "
                    "and no version directories holding one)"
                )
            found[name] = path
    else:
        if not root.is_dir():
            raise StartupError(
                f"models directory {root.resolve()} does not exist (set VAE_MODELS_DIR or --models-dir; relative "
                "paths resolve against the current directory)"
            )
        found = {path.name: path for path in model_folders(root)}
        if not found:
            raise StartupError(
                f"no checkpoints in {root.resolve()} (a checkpoint is a directory holding "
                f"{checkpoint.CARD_FILE} and {checkpoint.WEIGHTS_FILE})"
            )
    if settings.default_model is not None and settings.default_model not in found:
        raise StartupError(
            f"default model {settings.default_model!r} is not among the models found ({', '.join(sorted(found))}); "
            "set VAE_DEFAULT_MODEL or --default-model"
        )
    return found


def default_name(names: list[str]) -> str:
    """The model a request naming none gets, when the settings name none: the only one, else `mnist` (the bundled
    default) when served, else the first name in alphabetical order."""
    return "mnist" if "mnist" in names else sorted(names)[0]


@dataclass(frozen=True)
class FolderScan:
    """What a model folder holds now: its versions (name -> checkpoint directory, oldest first), their cards, and
    the default version."""

    versions: dict[str, Path]
    cards: dict[str, dict[str, Any]]
    default: str
    flat: bool


def failure(name: str, version: str, flat: bool) -> str:
    return f"cannot load model {name!r}" + ("" if flat else f" version {version!r}")


def scan_folder(name: str, folder: Path) -> FolderScan:
    """Read a model folder's layout, its versions.json and every version's card (not the weights); raises
    InvalidModelFolder with one line."""
    where = f"model {name!r}: {folder}"
    if not folder.is_dir():
        raise InvalidModelFolder(f"{where} is not a directory")
    subs = version_dirs(folder)
    flat = (folder / checkpoint.CARD_FILE).is_file()
    if flat and subs:
        raise InvalidModelFolder(
            f"{where} holds a checkpoint and version directories ({', '.join(p.name for p in subs)}); use one layout"
        )
    if not flat and not subs:
        raise InvalidModelFolder(f"{where} holds no checkpoint ({checkpoint.CARD_FILE}) and no version directory")
    for path in subs:
        if not NAME.fullmatch(path.name):
            raise InvalidModelFolder(
                f"{where}: {path.name!r} is not a version name (letters, digits, '.', '_', '-'; first a letter or "
                "digit)"
            )
    versions = {FLAT_VERSION: folder} if flat else {path.name: path for path in subs}
    cards = {}
    for version, path in versions.items():
        try:
            cards[version] = checkpoint.read_card(path)
        except checkpoint.CheckpointError as e:
            raise InvalidModelFolder(f"{failure(name, version, flat)}: {e}") from None
    default = pinned_version(where, folder / VERSIONS_FILE, versions) or next(reversed(versions))
    return FolderScan(versions, cards, default, flat)


def pinned_version(where: str, path: Path, versions: dict[str, Path]) -> str | None:
    """The `default` of a model folder's versions.json, checked against the versions there; None without one."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidModelFolder(f"{where}: {VERSIONS_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or set(config) - {"default"}:
        raise InvalidModelFolder(f'{where}: {VERSIONS_FILE} must be a JSON object like {{"default": "VERSION"}}')
    default = config.get("default")
    if default is not None and (not isinstance(default, str) or default not in versions):
        raise InvalidModelFolder(
            f"{where}: {VERSIONS_FILE} names default version {default!r}, which the folder does not hold "
            f"(versions: {', '.join(versions)})"
        )
    return default


def fingerprint(folder: Path) -> Fingerprint:
    """Size and mtime of every file a model folder is read from: any change (a version added or removed, weights
    replaced, versions.json edited) changes it. Empty when the folder is gone."""
    try:
        dirs = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]
    except OSError:
        return ()
    seen = []
    for directory in dirs:
        for name in (checkpoint.CARD_FILE, checkpoint.WEIGHTS_FILE, VERSIONS_FILE):
            try:
                stat = (directory / name).stat()
            except OSError:
                continue
            seen.append((f"{directory.name}/{name}", stat.st_size, stat.st_mtime_ns))
    return tuple(seen)


def check(predictor: VAEPredictor, warmup: bool) -> None:
    """Before any request can reach a version (on the forward thread): its outputs on a plain input must be finite,
    so weights that load but compute NaN are refused; then the warm-up. Raises CheckpointError."""
    c, h, w = predictor.input_shape
    outputs = predictor.predict("encode", {"x": torch.full((1, c, h, w), 0.5)})
    outputs |= predictor.predict("decode", {"z": torch.zeros(1, predictor.latent_dim)})
    if not all(bool(torch.isfinite(t).all()) for t in outputs.values()):
        raise checkpoint.CheckpointError("its outputs on a plain input are not finite (NaN or infinite weights)")
    if warmup:
        predictor.warmup()


def release_memory(device: torch.device) -> None:
    """After versions are dropped: collect what they left in reference cycles, hand the heap's free pages back to the
    system (glibc's malloc_trim; nothing more without glibc) and, on CUDA, the allocator's cached blocks to the
    device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory.trim()


# -- what serves -----------------------------------------------------------------------------------------------------
def _ignore(seconds: float | None) -> None:
    pass


@dataclass(eq=False)
class ServedModel:
    """One version of a model, serving: its predictor and batcher, and how many requests hold it (acquired, not yet
    released). `record` counts each released request for metrics: its seconds, or None when it failed."""

    predictor: VAEPredictor
    batcher: MicroBatcher
    record: Callable[[float | None], None] = field(default=_ignore, repr=False)
    in_flight: int = 0
    _idle: asyncio.Event | None = field(default=None, repr=False)
    version_bytes: bytes = field(init=False, repr=False)  # the version for a response header, encoded once

    def __post_init__(self) -> None:
        self.version_bytes = self.version.encode("latin-1")

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def version(self) -> str:
        return self.predictor.version

    def release(self, seconds: float | None) -> None:
        """The request holding this version is done: answered after `seconds`, or failed (None)."""
        self.in_flight -= 1
        self.record(seconds)
        if self._idle is not None and not self.in_flight:
            self._idle.set()

    async def retire(self, timeout: float) -> None:
        """Once no request can acquire it any more: wait (at most `timeout`) for the requests holding it to finish,
        then stop the batcher."""
        if self.in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                logger.warning(
                    "model %r version %r: %d requests still running after %g s; stopping it anyway",
                    self.name,
                    self.version,
                    self.in_flight,
                    timeout,
                )
        await self.batcher.stop()


@dataclass(eq=False)
class ModelState:
    """One model in the registry: where it is read from, its versions serving, and how the last change went."""

    name: str
    folder: Path
    versions: dict[str, ServedModel] = field(default_factory=dict)  # serving, oldest first
    default: str | None = None  # the version requests naming none get; None: the model is not served
    error: str | None = None  # why the last load or reload failed; None once one succeeds
    unloaded: bool = False  # unloaded at run time: the watch leaves it alone until it is loaded again
    seen: Fingerprint = ()  # the folder's fingerprint when it was last read
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def serves(self, version: str, card: dict[str, Any]) -> bool:
        """Whether `version` is serving with this very card (weights' sha256 included): a reload leaves it alone."""
        served = self.versions.get(version)
        return served is not None and served.predictor.card == card


@dataclass
class Change:
    """What a reload, load or unload did: the versions serving now and the default among them, those it loaded
    (validated and warmed) and those it unloaded (drained, batchers stopped)."""

    model: str
    default_version: str | None
    versions: list[str]
    loaded: list[str]
    unloaded: list[str]
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexEntry:
    """A row of the repository index (the shape of the v2 repository extension's): a model version, READY, or
    UNAVAILABLE with the reason."""

    name: str
    version: str
    state: str
    reason: str = ""


class RegistryObserver(BatchObserver):
    """Hooks for metrics, besides the batchers' (the default does nothing)."""

    def version_loaded(self, model: str, version: str) -> Callable[[float | None], None]:
        """A version starts serving; returns what counts its requests (ServedModel.record)."""
        return _ignore

    def version_unloaded(self, model: str, version: str) -> None: ...

    def load_result(self, model: str, ok: bool) -> None:
        """A load or reload of `model` finished, or failed (and whatever served before still serves)."""

    def versions_served(self, model: str, count: int) -> None: ...


class ModelRegistry:
    """The models and versions a server serves, and the one place that changes them.

    `acquire(name)` raises ModelNotReady until `start` has finished and after `stop` began, ModelNotFound naming
    what is served for an unknown model or version. `reload`, `load` and `unload` raise ModelNotFound and
    InvalidModelFolder (whatever served before still serves)."""

    def __init__(self, settings: Settings, observer: RegistryObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer or RegistryObserver()
        self.states: dict[str, ModelState] = {}
        self.models: dict[str, ServedModel] = {}  # name -> its default version, for every model served
        self.default: str | None = None
        self.ready = False
        self.max_item_values = 0  # the most numbers in one image or latent of a served model (C*H*W or latent_dim)
        self._routes: dict[str, ServedModel] = {}  # "NAME" (its default version) and "NAME@VERSION"
        self._stopping = False
        self._device = torch.device("cpu")
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._watch: asyncio.Task[None] | None = None
        self.newest_task = NewestTask()  # the loop's task factory while serving: see service.arrivals
        # the loop awake after a lone request (ditto), while no request is in flight
        self.linger = Linger(settings.inline_linger_us / 1e6, lambda: self.requests_in_flight() == 0)

    # -- start and stop --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Discover, load and warm every model, then start its batchers; raises StartupError with one message."""
        s = self.settings
        self.newest_task.install(asyncio.get_running_loop())
        try:
            self._device = resolve_device(s.device)
        except (ValueError, RuntimeError) as e:
            raise StartupError(str(e)) from None
        if s.cpu_threads:
            torch.set_num_threads(s.cpu_threads)
        try:
            for name, folder in discover(s).items():
                state = self.states[name] = ModelState(name, folder)
                try:
                    await self._sync(state)
                except InvalidModelFolder as e:
                    raise StartupError(e.detail) from None
        except BaseException:
            await self.stop()
            raise
        self.default = s.default_model or default_name(list(self.models))
        self.ready = True
        if s.watch_models_s > 0:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop(), name="watch-models")

    async def stop(self) -> None:
        self.ready = False
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
        self._routes, self.models = {}, {}
        for state in self.states.values():
            for served in state.versions.values():
                await served.batcher.stop()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self.newest_task.uninstall()

    # -- requests --------------------------------------------------------------------------------------------------
    def acquire(self, name: str | None) -> ServedModel:
        """The version a request names ("NAME": the model's default version, "NAME@VERSION", or None: the default
        model), held by the request until it calls `release` on it: no change moves it to another version, nor stops
        the batcher under it."""
        served = self._routes.get(name or self.default or "")
        if served is None:
            raise self._missing(name)
        served.in_flight += 1
        return served

    def requests_in_flight(self) -> int:
        """Requests holding any version of any model (acquired, not yet released)."""
        return sum(served.in_flight for state in self.states.values() for served in state.versions.values())

    def get(self, name: str | None) -> ServedModel:
        """The version `name` resolves to now, to describe it (not held: never submit work to it)."""
        served = self._routes.get(name or self.default or "")
        if served is None:
            raise self._missing(name)
        return served

    def versions(self, name: str) -> dict[str, ServedModel]:
        """The versions of model `name` serving now, oldest first; empty when it is not served. To describe them (not
        held, as `get`)."""
        state = self.states.get(name)
        return dict(state.versions) if state is not None and state.default is not None else {}

    def check_ready(self) -> None:
        """Raises ModelNotReady before `start` has finished and after `stop` began."""
        if not self.ready:
            raise self._missing(None)

    def _missing(self, name: str | None) -> ServiceError:
        if not self.ready:
            return ModelNotReady("the server is shutting down" if self._stopping else "models are not loaded yet")
        model, _, version = (name or self.default or "").partition("@")
        state = self.states.get(model)
        served = ", ".join(sorted(self.models)) or "none"
        if state is None:
            return ModelNotFound(f"unknown model {model!r}; served models: {served}")
        if state.default is None:
            why = "it was unloaded" if state.unloaded else f"its last load failed: {state.error}"
            return ModelNotFound(f"model {model!r} is not loaded ({why}); served models: {served}")
        return ModelNotFound(f"model {model!r} has no version {version!r}; its versions: {', '.join(state.versions)}")

    def _publish(self) -> None:
        """Replace the routing table requests read, in one assignment."""
        routes: dict[str, ServedModel] = {}
        models: dict[str, ServedModel] = {}
        for name, state in self.states.items():
            if state.default is None:
                continue
            for version, served in state.versions.items():
                routes[f"{name}@{version}"] = served
            routes[name] = models[name] = state.versions[state.default]
        self._routes, self.models = routes, models
        self.max_item_values = max(
            (max(math.prod(m.predictor.input_shape), m.predictor.latent_dim) for m in routes.values()), default=0
        )

    # -- changes at run time ---------------------------------------------------------------------------------------
    async def reload(self, name: str) -> Change:
        """Re-read a served model's folder and serve what it holds now: new versions loaded beside the old ones,
        changed ones replaced, removed ones drained; the default version as versions.json says, else the newest."""
        state = self.states.get(name)
        if state is None:
            raise self._unknown(name)
        async with state.lock:
            if state.default is None:  # not served (or unloaded while this call waited for the lock)
                raise self._missing(name)
            return await self._sync(state)

    async def load(self, name: str) -> Change:
        """Serve a model from its folder: one not served (new in models_dir, unloaded, or failed) is loaded, a served
        one reloaded (as Triton's load does)."""
        state = self.states.get(name)
        if state is None:
            folder = self._folder_of(name)
            state = self.states.setdefault(name, ModelState(name, folder))
        async with state.lock:
            return await self._sync(state)

    async def unload(self, name: str) -> Change:
        """Stop serving a model: new requests for it get 404 at once; the requests holding one of its versions
        finish; then its batchers stop and its memory is handed back."""
        state = self.states.get(name)
        if state is None:
            raise self._unknown(name)
        async with state.lock:
            if state.default is None:
                raise self._missing(name)
            started = time.perf_counter()
            gone = list(state.versions.values())
            change = Change(name, None, [], [], [served.version for served in gone])
            state.versions, state.default, state.error, state.unloaded = {}, None, None, True
            self._publish()
            self.observer.versions_served(name, 0)
            await self._retire(gone)
            change.seconds = time.perf_counter() - started
            logger.info("model %r unloaded (versions %s) in %.2f s", name, ", ".join(change.unloaded), change.seconds)
            return change

    def index(self) -> list[IndexEntry]:
        """Every model known (served, unloaded, or failed to load), and the model folders in models_dir not loaded
        yet when the server serves all of them: READY per version served, else one UNAVAILABLE entry with why."""
        names = set(self.states)
        if self.settings.models is None:
            names.update(path.name for path in model_folders(self.settings.models_dir.expanduser()))
        entries = []
        for name in sorted(names):
            state = self.states.get(name)
            if state is not None and state.versions:
                reason = f"the last reload failed: {state.error}" if state.error else ""
                entries += [IndexEntry(name, version, "READY", reason) for version in state.versions]
            elif state is None:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", "not loaded"))
            else:
                reason = "unloaded" if state.unloaded else f"load failed: {state.error}"
                entries.append(IndexEntry(name, "", "UNAVAILABLE", reason))
        return entries

    async def poll(self) -> list[Change]:
        """One look at the models directory (the watch's tick): every model whose folder changed since it was last
        read is reloaded, and, when all of models_dir is served, new model folders are loaded. Models unloaded at
        run time are left alone. A failed change is logged and kept in the model's state (`error`)."""
        names = [name for name, state in self.states.items() if not state.unloaded]
        if self.settings.models is None:
            found = await asyncio.to_thread(model_folders, self.settings.models_dir.expanduser())
            names += [path.name for path in found if path.name not in self.states]
        changes = []
        for name in names:
            state = self.states.get(name)
            if state is None:
                try:
                    state = self.states.setdefault(name, ModelState(name, self._folder_of(name)))
                except ModelNotFound:  # gone again since it was listed
                    continue
            async with state.lock:
                if state.unloaded or await asyncio.to_thread(fingerprint, state.folder) == state.seen:
                    continue
                try:
                    changes.append(await self._sync(state))
                except InvalidModelFolder:
                    pass  # logged, and kept in state.error
        return changes

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_models_s)
            try:
                await self.poll()
            except Exception:
                logger.exception("watching %s failed", self.settings.models_dir)

    def _unknown(self, name: str) -> ModelNotFound:
        return ModelNotFound(f"unknown model {name!r}; served models: {', '.join(sorted(self.models)) or 'none'}")

    def _folder_of(self, name: str) -> Path:
        root = self.settings.models_dir.expanduser()
        if not NAME.fullmatch(name) or not is_model_folder(root / name):
            there = ", ".join(path.name for path in model_folders(root)) or "none"
            raise ModelNotFound(f"no model folder {name!r} in {root}; model folders there: {there}")
        return root / name

    async def _sync(self, state: ModelState) -> Change:
        """Serve what the model's folder holds now (the caller holds state.lock): versions whose card is unchanged
        keep serving untouched, new and changed ones are started beside them, then published, all or nothing."""
        started = time.perf_counter()
        name = state.name
        seen = await asyncio.to_thread(fingerprint, state.folder)
        fresh: dict[str, ServedModel] = {}
        try:
            scan = await asyncio.to_thread(scan_folder, name, state.folder)
            try:
                for version, path in scan.versions.items():
                    if not state.serves(version, scan.cards[version]):
                        fresh[version] = await self._start_version(name, version, path, scan.flat)
            except BaseException:
                for served in fresh.values():
                    await served.batcher.stop()
                raise
        except InvalidModelFolder as e:
            state.error, state.seen = e.detail, seen
            self.observer.load_result(name, False)
            serving = ", ".join(state.versions)
            logger.error("%s%s", e.detail, f" (still serving versions {serving})" if serving else "")
            raise
        for served in fresh.values():
            served.record = self.observer.version_loaded(name, served.version)
        versions = {version: fresh.get(version) or state.versions[version] for version in scan.versions}
        gone = [served for version, served in state.versions.items() if versions.get(version) is not served]
        change = Change(name, scan.default, list(versions), list(fresh), [served.version for served in gone])
        state.versions, state.default = versions, scan.default
        state.error, state.unloaded, state.seen = None, False, seen
        del versions, fresh  # from here on, only `gone` holds the versions that leave
        self._publish()
        self.observer.load_result(name, True)
        self.observer.versions_served(name, len(change.versions))
        await self._retire(gone)
        change.seconds = time.perf_counter() - started
        if change.loaded or change.unloaded:
            logger.info(
                "model %r now serves versions %s (default %s): loaded %s, unloaded %s, in %.2f s",
                name,
                ", ".join(change.versions),
                change.default_version,
                ", ".join(change.loaded) or "none",
                ", ".join(change.unloaded) or "none",
                change.seconds,
            )
        return change

    async def _start_version(self, name: str, version: str, path: Path, flat: bool) -> ServedModel:
        """Load one version (checkpoint.load checks the sha256 and the config), validate and warm it, start its
        batcher: all before any request can reach it."""
        s = self.settings
        executor = self._executors.get(str(self._device))
        if executor is None:  # one worker thread per device: its forwards are serialised (a lone small request's
            # forward may run on the event loop instead: MicroBatcher's inline_max_images)
            executor = self._executors[str(self._device)] = ThreadPoolExecutor(
                1, thread_name_prefix=f"vae-forward-{self._device}"
            )
        loop = asyncio.get_running_loop()
        try:
            # On the forward thread, not a separate loader thread: a model built on another thread served its
            # forwards 15-20 % slower at one client (bench/serving.py against the build before versions, 2026-12-03;
            # the same code loading here matched it). A reload pauses the forwards for the read, hash and build
            # (tens of ms for a few MB of weights) instead.
            predictor = await loop.run_in_executor(
                executor,
                VAEPredictor.load,
                name,
                path,
                self._device,
                s.dtype,
                s.max_image_pixels,
                s.ood_fpr,
                version,
            )
            await loop.run_in_executor(executor, check, predictor, s.warmup)
        except checkpoint.CheckpointError as e:
            raise InvalidModelFolder(f"{failure(name, version, flat)}: {e}") from None
        except Exception as e:  # anything else the files make the model do (a forward failing, a read error)
            message = " ".join(str(e).split())
            raise InvalidModelFolder(f"{failure(name, version, flat)}: {type(e).__name__}: {message}") from None
        batcher = MicroBatcher(
            name,
            predictor.predict,
            executor,
            mergeable=MERGEABLE_OPS,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            queue_size=s.queue_size,
            batching=s.batching,
            observer=self.observer,
            inline_max_images=s.inline_max_images if self._device.type == "cpu" else 0,
            alone=lambda: self.requests_in_flight() <= 1,
            latest=self.newest_task.is_current,
            after_inline=self.linger.request,
        )
        batcher.start()
        cfg = predictor.config
        logger.info(
            "model %r version %r loaded from %s: %s %s, latent %d, input %s, on %s (%s)",
            name,
            version,
            path,
            cfg.kind,
            cfg.likelihood,
            cfg.latent_dim,
            "x".join(map(str, cfg.input_shape)),
            self._device,
            predictor.dtype,
        )
        return ServedModel(predictor, batcher)

    async def _retire(self, gone: list[ServedModel]) -> None:
        """Versions no longer routed to: drained and stopped, then their memory handed back. Empties `gone` (the
        caller's list) so that nothing holds them by then."""
        if not gone:
            return
        timeout = self.settings.request_timeout_s + DRAIN_MARGIN_S
        await asyncio.gather(*(served.retire(timeout) for served in gone))
        retired = [(served.name, served.version) for served in gone]
        gone.clear()
        for model, version in retired:
            self.observer.version_unloaded(model, version)
        await asyncio.to_thread(release_memory, self._device)
