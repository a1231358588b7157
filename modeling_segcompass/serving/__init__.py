"""Serving: getting a trained model to users.

`hub` exports a self-contained Hub folder and pushes it; `model_card` writes its README.md;
`space_app` (a Gradio Space) and `endpoint_handler` (Inference Endpoints) are copied into that
folder as app.py / handler.py.
"""
