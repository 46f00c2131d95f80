"""Objectives: ``objective(model, inputs, *, step, total_steps) -> (loss, logs)``."""
