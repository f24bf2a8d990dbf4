"""Running the network: the ``Detector`` (``detector``), where and in which precision it runs
(``runtime``), ``precision="auto"``'s timing (``autotune``), the int8 network (``int8``),
and an exported ONNX graph served through ONNX Runtime without torch (``onnx_detector``).
Imports ``model.network`` and ``model.weights``."""
