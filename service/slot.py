"""The HTTP app's view of its engine through its life: Loading, then a ready Engine or Failed."""

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from service.engine import Engine
from service.errors import LoadFailed, NotAccepting, NotReady
from service.loading import load_failure_reason
from service.settings import Settings


@dataclass(frozen=True)
class Failed:
    """Loading failed: why, in one line an operator can act on."""

    reason: str


class Loading:
    """The model is still loading."""


# Builds a complete Engine for the settings, or raises (`service.loading.load_engine`).
EngineLoader = Callable[[Settings], Awaitable[Engine]]


class EngineSlot:
    """The app's engine: Loading, then a ready Engine or Failed. /health, /ready and /classify answer 503 until it
    holds a ready Engine."""

    def __init__(self, settings: Settings, load: EngineLoader) -> None:
        self.settings = settings
        self._load = load
        self.state: Loading | Failed | Engine = Loading()

    async def load(self) -> None:
        """Load the engine; a failure is kept (and logged), not raised."""
        try:
            self.state = await self._load(self.settings)
        except Exception as error:
            self.state = Failed(load_failure_reason(error))

    @property
    def failure(self) -> str | None:
        """Why the model could not be loaded, if it could not."""
        return self.state.reason if isinstance(self.state, Failed) else None

    @property
    def ready(self) -> bool:
        return not isinstance(self.state, (Loading, Failed)) and self.state.ready

    def engine(self) -> Engine:
        """The ready engine; raises LoadFailed, NotReady or NotAccepting (all 503) otherwise."""
        if isinstance(self.state, Failed):
            raise LoadFailed(self.state.reason)
        if isinstance(self.state, Loading):
            raise NotReady()
        if not self.state.ready:  # stopping, or (with --workers) its engine process is gone: this replica ends
            raise NotAccepting()
        return self.state

    def info(self) -> dict[str, Any]:
        """What /info shows: the settings and the runtime always, and the loaded engine's details once loaded."""
        info = {
            "model": self.settings.model or "default",
            "ready": self.ready,
            "failure": self.failure,
            "settings": self.settings.model_dump(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        if not isinstance(self.state, (Loading, Failed)):
            info.update(self.state.info())
        return info

    async def stop(self) -> None:
        if not isinstance(self.state, (Loading, Failed)):
            await self.state.stop()
