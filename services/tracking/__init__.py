"""Tracking service: SAM3 propagates the grounded boxes through the video (one pass per BAIT anchor)."""
