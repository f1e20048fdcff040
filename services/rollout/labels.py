"""Version labels for a rollout (opt-in, ``--labels-config FILE``): the controller moves ``stable`` and ``canary`` in
the model server's config file (TF Serving's text ModelServerConfig, which the model server re-reads every
``--model_config_file_poll_wait_seconds``) and routes by label, as operators do with ``admin set stable=90
canary=10``. Only the ``version_labels`` of the controller's model change; every other field is kept. A move is
done once the model server's REST metadata of each label names the wanted version (TF Serving's
``GET /v1/models/<name>/labels/<label>/metadata``: its model status does not read a label).
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from services.rollout.clients import ModelServerStates

STABLE, CANARY = "stable", "canary"


class LabelsNotApplied(RuntimeError):
    pass


class LabelConfig:
    def __init__(self, path: str | Path, model_name: str, model_server: ModelServerStates,
                 wait_seconds: float = 30.0, clock=time.monotonic):
        self.path = Path(path)
        self.model_name = model_name
        self.model_server = model_server
        self.wait_seconds = wait_seconds
        self.clock = clock

    def _read(self):
        config = text_format.Parse(self.path.read_text(), model_server_config_pb2.ModelServerConfig())
        for model in config.model_config_list.config:
            if model.name == self.model_name:
                return config, model
        raise LabelsNotApplied(f"{self.path} has no model {self.model_name!r}")

    def current(self) -> dict[str, int]:
        return dict(self._read()[1].version_labels)

    def write(self, labels: dict[str, int]) -> bool:
        """Sets the model's labels to exactly ``labels`` (atomic rename); False when they were already so."""
        config, model = self._read()
        if dict(model.version_labels) == labels:
            return False
        model.version_labels.clear()
        for label, version in labels.items():
            model.version_labels[label] = version
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_text(text_format.MessageToString(config))
        os.replace(tmp, self.path)
        return True

    async def move(self, labels: dict[str, int]) -> None:
        """Writes ``labels`` and waits until the model server serves each of them at its version."""
        await asyncio.to_thread(self.write, labels)
        deadline = self.clock() + self.wait_seconds
        while True:
            seen = {label: await self.model_server.label_version(label) for label in labels}
            if seen == labels:
                return
            if self.clock() > deadline:
                raise LabelsNotApplied(f"the model server still resolves {seen}, not {labels}, {self.wait_seconds:g} "
                                       f"s after {self.path} was written (does it poll its config file?)")
            await asyncio.sleep(0.2)
