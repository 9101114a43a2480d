"""Model services, one folder each: grounding, image_edit, i2v, tracking, control, editscore."""
