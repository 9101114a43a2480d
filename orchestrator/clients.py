"""The six model services as the pipeline's stages see them: one typed client each, over one transport.

A client (``services/<name>/app.py``) builds its service's requests from the service's own models, sends
artifact keys and returns handles (:mod:`sparkle.artifacts`). Where the call goes is the transport's business:

- :func:`in_process`: the services' APIs in this process, on model backends (the embedded default);
- :func:`over_queues <sparkle.orchestrator.calls.QueueTransport>`: Celery messages to the service queues (the
  distributed run).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkle.artifacts import ArtifactIO
from sparkle.backends import SERVICES, Backends
from sparkle.service import InProcessTransport, Transport
from sparkle.services.control.app import ControlAPI, ControlClient
from sparkle.services.editscore.app import EditScoreAPI, EditScoreClient
from sparkle.services.grounding.app import GroundingAPI, GroundingClient
from sparkle.services.i2v.app import I2VAPI, I2VClient
from sparkle.services.image_edit.app import ImageEditAPI, ImageEditClient
from sparkle.services.tracking.app import TrackingAPI, TrackingClient

APIS = {"grounding": GroundingAPI, "image_edit": ImageEditAPI, "i2v": I2VAPI, "tracking": TrackingAPI,
        "control": ControlAPI, "editscore": EditScoreAPI}
"""Service name -> its API class (the declared operations)."""


@dataclass
class Services:
    """The six service clients of one journey, sharing a transport and the journey's :class:`ArtifactIO`."""

    grounding: GroundingClient
    image_edit: ImageEditClient
    i2v: I2VClient
    tracking: TrackingClient
    control: ControlClient
    editscore: EditScoreClient
    transport: Transport

    @classmethod
    def over(cls, transport: Transport, io: ArtifactIO) -> Services:
        return cls(grounding=GroundingClient(transport, io), image_edit=ImageEditClient(transport, io),
                   i2v=I2VClient(transport, io), tracking=TrackingClient(transport, io),
                   control=ControlClient(transport, io), editscore=EditScoreClient(transport, io),
                   transport=transport)

    def names(self) -> dict[str, str]:
        """Service -> what serves it: the model backend's name in-process, ``queue:<service>`` over the queues."""
        return {s: self.transport.backend_name(s) for s in SERVICES}


def in_process(backends: Backends, io: ArtifactIO) -> Services:
    """Clients calling the six APIs in this process on ``backends`` (already set up), through ``io``."""
    return Services.over(InProcessTransport({s: APIS[s](getattr(backends, s), io) for s in SERVICES}), io)
