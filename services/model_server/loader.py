"""A Loader, as TF Serving's core/loader.h: cheap to construct (a model name, a version, a folder); ``load()`` does
all the I/O (reading the SavedModel, replaying its warm-up requests) and returns the Servable. The manager holds
loaders for the versions the source aspires and calls ``load()`` only when the version policy says so."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.model_server import metrics


@dataclass(frozen=True)
class Loader:
    model_name: str
    version: int
    path: Path

    def load(self):
        """Build the servable (raises whatever loading raises); the time it took is recorded."""
        from services.model_server.servable import load_servable

        servable, seconds = load_servable(self.model_name, self.version, self.path)
        metrics.LOAD_SECONDS.labels(model_name=self.model_name).observe(seconds)
        return servable
