"""Evaluation: segmentation metrics (gIoU, cIoU, per-group results) for SegCompass outputs."""
