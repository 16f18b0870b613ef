"""Is the Hugging Face Hub reachable? Asked once, answered in seconds.

`datasets` and `transformers` retry an unreachable Hub for half a minute before failing with a
long traceback; every loader asks here first and fails with one line that says what to do.
"""

import functools
import os
import socket
from urllib.parse import urlparse

from env import UserError

HUB_URL = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.cache
def reachable(url=HUB_URL, timeout=5.0):
    """True when a TCP connection to the host of `url` opens within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def require(what, offline_hint, url=HUB_URL):
    """Raise a UserError naming `what` could not be downloaded and `offline_hint`, when offline."""
    if not reachable(url):
        host = urlparse(url).hostname
        raise UserError(f"cannot reach {host} to download {what}: {offline_hint}")
