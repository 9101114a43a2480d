"""TEST DOUBLE of the image_edit model backend (``--backend double``): see :mod:`sparkle.doubles`."""

from __future__ import annotations

from sparkle.doubles import Double


class DoubleImageEditor(Double):
    def edit_background(self, ctx, image, instruction):
        self.sleep("image_edit.edit_background")
        return 255 - image

    def remove_foreground(self, ctx, image, objects):
        self.sleep("image_edit.remove_foreground")
        return image.copy()


def make_backend(scale: float = 0.0, delay_s: float = 0.0, **_ignored) -> DoubleImageEditor:
    """The test double (``scale``, ``delay_s``: see :mod:`sparkle.doubles`)."""
    return DoubleImageEditor("image_edit", scale, delay_s)
