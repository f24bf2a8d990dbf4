"""The network and its arithmetic: the SSD (``ssd``) on its VGG16 base (``vgg``), default boxes
(``default_boxes``), box coding (``box_coding``), IoU and box formats (``boxes``), matching and
the MultiBox loss (``matching``, ``loss``), post-processing (``postprocess``), image
preprocessing (``preprocessing``, and torch-free ``pixels``), and what a detector is asked and
answers (``detections``, torch-free). Imports nothing else of ``model``."""
