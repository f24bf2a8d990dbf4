"""The SSD detector: network builders, training pieces and the image-to-detections API."""

from model.inference.detector import Detector
from model.network.postprocess import Detections
from model.network.ssd import SSD, ssd300_vgg16, ssd512_vgg16

__all__ = ["SSD", "Detections", "Detector", "ssd300_vgg16", "ssd512_vgg16"]
