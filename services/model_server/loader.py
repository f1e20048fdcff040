"""A Loader, as TF Serving's core/loader.h: cheap to construct (a model name, a version, a folder); ``load()`` does
all the I/O (reading the SavedModel, replaying its warm-up requests) and returns the Servable. The manager holds
loaders for the versions the source aspires and calls ``load()`` only when the version policy says so."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.model_server import metrics


@dataclass(frozen=True)
class LoadOptions:
    """How versions are loaded, from tensorflow_model_server's flags: --saved_model_tags (the MetaGraphDef whose
    tag set is exactly these), --enable_model_warmup, --num_request_iterations_for_warmup, --prefer_tflite_model
    (a `model.tflite` in the version folder is served instead of the SavedModel when there is one: read by the
    TFLite engine), and the intra-op threads an operator fixed (--tensorflow_intra_op_parallelism or
    --tensorflow_session_parallelism): every TFLite interpreter's, lone calls' too (0 = automatic)."""
    tags: tuple[str, ...] = ("serve",)
    warmup: bool = True
    warmup_iterations: int = 1
    prefer_tflite_model: bool = False
    intra_op_threads: int = 0


@dataclass(frozen=True)
class Loader:
    model_name: str
    version: int
    path: Path
    options: LoadOptions = LoadOptions()
    contents: tuple = ()  # what the source saw in the folder (``source.folder_contents``): a change re-arms a failure

    def load(self):
        """Build the servable (raises whatever loading raises); the time it took is recorded."""
        from services.model_server.servable import load_servable

        servable, seconds = load_servable(self.model_name, self.version, self.path, self.options)
        metrics.LOAD_SECONDS.labels(model_name=self.model_name).observe(seconds)
        return servable
