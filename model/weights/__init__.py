"""Weights files: this project's self-describing checkpoints (``checkpoint``), published detector
weights converted as they load (``published``), ImageNet VGG16 backbones (``imagenet``),
torch's download cache (``torch_cache``), and the torch-free names of weight sources and file
versions (``sources``). Imports only ``model.network``."""
