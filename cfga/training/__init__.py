"""Checkpoints the pipeline makes itself: the offline backbone classifier and DML fine-tuning."""
