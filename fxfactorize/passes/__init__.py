"""The pipeline, one pass per module: trace → shapes → cost → plan → (calibrate) → solve → rewrite."""
