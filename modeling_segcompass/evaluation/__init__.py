"""Evaluation: segmentation metrics (gIoU, cIoU, N-acc, per-group results) and the row
evaluation (generate or teacher-force, then score) that the CLI and the demo share."""
