"""EditScore service: judges every manipulation (frame-0 edit, foreground removal, sampled video frames)."""
