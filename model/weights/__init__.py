"""Weights files: this project's self-describing checkpoints (``checkpoint``), published detector
weights converted as they load (``published``), ImageNet VGG16 backbones (``imagenet``) and
torch's download cache (``torch_cache``). Imports only ``model.network``."""
