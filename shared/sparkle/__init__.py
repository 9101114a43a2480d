"""Sparkle Factory: the Sparkle data pipeline for instruction-guided video background replacement.

``sparkle`` is the project's common library and the ground floor (folder ``shared/``): configuration, the
artifact layout and store, artifact handles, video and mask I/O, the model backend interfaces, how a service
declares its operations (``service``) and the HTTP shell that serves them (``serving``), the queue names and
settings of the distributed run, and the backend-independent algorithms. It imports nothing from the floors
above: ``sparkle.services`` (folder ``services/``, one folder per model service) and ``sparkle.orchestrator``
(folder ``orchestrator/``: a sample's journey, the distributed run, the CLI).
"""

__version__ = "0.1.0"
