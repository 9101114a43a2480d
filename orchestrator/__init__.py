"""The orchestrator: a sample's journey through stages 1-5 (``pipeline``), run in-process or on workers."""
