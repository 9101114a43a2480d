"""The orchestrator (the top floor): a sample's journey through stages 1-5 (``pipeline``), run in-process
(``local``) or on queue workers (``journey``, ``calls``, ``datasets``), the gateway and the ``sparkle`` CLI."""
