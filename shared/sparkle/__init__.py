"""Sparkle Factory: the Sparkle data pipeline for instruction-guided video background replacement.

``sparkle`` is the project's common library (folder ``shared/``): configuration, the artifact layout
and store, video and mask I/O, record schemas, the stage backend interfaces and the backend-independent
algorithms. ``sparkle.orchestrator`` (folder ``orchestrator/``) tells a sample's journey;
``sparkle.services`` (folder ``services/``) holds one folder per model service.
"""

__version__ = "0.1.0"
