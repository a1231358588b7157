"""Interpretability: concept-level explanations of a SegCompass model.

`explain` traces, ablates and reports the SAE concepts behind a segmentation;
`labels` names the concepts from the tokens that activate them.
"""
