"""Assembly: building a SegCompass model from parts.

`backbones` assembles a model + processor from a pretrained VLM, SAM and SAE;
`tokenizer_builder` trains the tiny local tokenizer. Modules load on import, not here.
"""
