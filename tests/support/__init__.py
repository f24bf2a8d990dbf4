"""Helpers shared by the test packages and the benchmarks: the real server in a subprocess
(``server_process``) and a network that refuses every connection (``offline``)."""
