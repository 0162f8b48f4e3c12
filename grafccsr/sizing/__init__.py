"""Sizing runs before they start: the fake-tensor memory estimator, the batch-size finder,
calibration against measured peaks, and process RSS of real iterations. Sits above training
(it runs the real training step)."""
