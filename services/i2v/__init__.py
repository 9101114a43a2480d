"""I2V service: Wan2.2-I2V-A14B with LightX2V 4-step distillation animates the clean plate."""
