"""torchvision's published weights as files in torch's cache (``$TORCH_HOME/hub/checkpoints``).

One way to get them, for every user of published weights (``model.weights.imagenet``,
``model.weights.published``): torchvision's weights API downloads a missing file once, checking the
sha256 prefix torch puts in each file name (``check_hash``); a file already in the cache is
used as it is, as torch itself does. Offline, the download fails at once (no route, no name;
a silent firewall within ``FETCH_TIMEOUT_S`` per socket operation) and the error names the
URL and the exact path to place the file at.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

# Per socket operation while fetching: an offline machine fails at once (no route, no name),
# a machine behind a silent firewall within this.
FETCH_TIMEOUT_S = 30.0
# torch.hub's file names end in "-<first hex digits of the file's sha256>" (check_hash).
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def cache_path(weights: WeightsEnum) -> Path:
    """Where torch's cache keeps ``weights`` (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def hash_in_name(path: str | os.PathLike[str]) -> str | None:
    """The sha256 prefix torch.hub puts in a weights file's name, or None when there is none."""
    found = _HASH_IN_NAME.search(Path(path).name)
    return found.group(1) if found else None


def fetch(weights: WeightsEnum, alternative: str) -> Path:
    """The cached file of ``weights``, downloaded there first when missing (hash checked).

    ``alternative`` ends the offline message: what else the user can do (a flag to pass a
    path, for instance).

    Raises:
        FileNotFoundError: not cached and the download failed (offline); the message names
            the URL and the path to place the file at.
    """
    path = cache_path(weights)
    if path.is_file():
        return path
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(FETCH_TIMEOUT_S)
    try:
        # Downloaded only: the caller reads it (weights-only) once it is in place.
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), hash_in_name(path), progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise FileNotFoundError(
            f"cannot download {weights} ({exc}). Offline, download {weights.url} elsewhere "
            f"and place it at {path} (torch's cache; set TORCH_HOME to move it), "
            f"{alternative}."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    return path
