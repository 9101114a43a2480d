"""Backend-independent algorithms of the Sparkle pipeline (camera filter, BAIT vote, decoupled control)."""
