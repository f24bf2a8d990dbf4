"""Evaluation: a Detector over a dataset scored as VOC and COCO AP (``evaluate``; the command is
``python -m model.evaluate``), the AP arithmetic (``average_precision``) and pictures of a run
(``curves``: training curves and precision-recall curves)."""
