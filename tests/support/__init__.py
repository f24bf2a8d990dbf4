"""Helpers shared by the test packages and the benchmarks: the real server in a subprocess
(``server_process``), a network that refuses every connection (``offline``), and two
runtimes' detections compared (``matching``)."""
