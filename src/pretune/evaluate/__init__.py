"""Evaluation of fine-tuned models: metrics as pure functions on arrays and lists (see ``metrics``)."""
