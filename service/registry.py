"""The models a server serves: discovery in the models directory, loading, warm-up, one batcher each."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from model import checkpoint
from model.device import resolve_device
from service.batching import BatchObserver, MicroBatcher
from service.errors import ModelNotFound, ModelNotReady, StartupError
from service.predictor import MERGEABLE_OPS, VAEPredictor
from service.settings import Settings

logger = logging.getLogger("vae_serve")


@dataclass
class ServedModel:
    predictor: VAEPredictor
    batcher: MicroBatcher

    @property
    def name(self) -> str:
        return self.predictor.name


def discover(settings: Settings) -> dict[str, Path]:
    """Model name -> checkpoint directory. A model's name is its directory's name (what `?model=` takes; the card's
    own `name` is only shown in its card). Raises StartupError with one clear line."""
    root = settings.models_dir.expanduser()
    found: dict[str, Path] = {}
    if settings.models:
        for entry in settings.models:
            as_path = Path(entry).expanduser()
            path = as_path if (os.sep in entry or as_path.is_absolute()) else root / entry
            name = path.resolve().name
            if name in found:
                raise StartupError(f"two models are named {name!r}: {found[name]} and {path}")
            if not (path / checkpoint.CARD_FILE).is_file():
                raise StartupError(
                    f"model {entry!r}: {path.resolve()} is not a checkpoint directory (no {checkpoint.CARD_FILE})"
                )
            found[name] = path
    else:
        if not root.is_dir():
            raise StartupError(
                f"models directory {root.resolve()} does not exist (set VAE_MODELS_DIR or --models-dir; relative "
                "paths resolve against the current directory)"
            )
        for path in sorted(root.iterdir()):
            if path.is_dir() and (path / checkpoint.CARD_FILE).is_file():
                found[path.name] = path
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


class ModelRegistry:
    """Loads every model at start-up and hands out the right one per request.

    `get(name)` raises ModelNotReady until `start` has finished and after `stop` began, ModelNotFound for an
    unknown name."""

    def __init__(self, settings: Settings, observer: BatchObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None
        self.ready = False
        self.max_item_values = 0  # the most numbers in one image or latent of a served model (C*H*W or latent_dim)
        self._executors: dict[str, ThreadPoolExecutor] = {}

    async def start(self) -> None:
        """Discover, load and warm every model, then start its batcher; raises StartupError with one message."""
        s = self.settings
        try:
            device = resolve_device(s.device)
        except (ValueError, RuntimeError) as e:
            raise StartupError(str(e)) from None
        if s.cpu_threads:
            torch.set_num_threads(s.cpu_threads)
        paths = discover(s)
        # One worker thread per device: forwards of all models on it are serialised, never on the event loop.
        executor = self._executors.setdefault(
            str(device), ThreadPoolExecutor(1, thread_name_prefix=f"vae-forward-{device}")
        )
        try:
            for name, path in paths.items():
                await self._load(name, path, device, executor)
        except BaseException:
            await self.stop()
            raise
        self.default = s.default_model or default_name(list(self.models))
        self.max_item_values = max(
            max(math.prod(m.predictor.input_shape), m.predictor.latent_dim) for m in self.models.values()
        )
        self.ready = True

    async def _load(self, name: str, path: Path, device: torch.device, executor: ThreadPoolExecutor) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            predictor = await loop.run_in_executor(
                executor, VAEPredictor.load, name, path, device, s.dtype, s.max_image_pixels, s.ood_fpr
            )
        except checkpoint.CheckpointError as e:
            raise StartupError(f"cannot load model {name!r}: {e}") from None
        if s.warmup:
            await loop.run_in_executor(executor, predictor.warmup)
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
        )
        batcher.start()
        self.models[name] = ServedModel(predictor, batcher)
        cfg = predictor.config
        logger.info(
            "model %r loaded from %s: %s %s, latent %d, input %s, on %s (%s)",
            name,
            path,
            cfg.kind,
            cfg.likelihood,
            cfg.latent_dim,
            "x".join(map(str, cfg.input_shape)),
            device,
            predictor.dtype,
        )

    async def stop(self) -> None:
        self.ready = False
        for served in self.models.values():
            await served.batcher.stop()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    def get(self, name: str | None) -> ServedModel:
        if not self.ready:
            raise ModelNotReady("models are not loaded yet" if not self.models else "the server is shutting down")
        key = name or self.default
        served = self.models.get(key or "")
        if served is None:
            raise ModelNotFound(f"unknown model {key!r}; served models: {', '.join(sorted(self.models))}")
        return served
