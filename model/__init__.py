"""The SSD detector: network builders, training pieces and the image-to-detections API."""

from model.detector import Detector
from model.postprocess import Detections
from model.ssd import SSD, ssd300_vgg16, ssd512_vgg16

__all__ = ["SSD", "Detections", "Detector", "ssd300_vgg16", "ssd512_vgg16"]
