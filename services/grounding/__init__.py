"""Grounding service: Qwen3-VL (served by vLLM) finds and re-locates the foreground to preserve."""
