"""Running the network: the ``Detector`` (``detector``), where and in which precision it runs
(``runtime``), ``precision="auto"``'s timing (``autotune``) and the int8 network
(``int8``). Imports ``model.network`` and ``model.weights``."""
