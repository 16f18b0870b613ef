"""Every download asks here first whether the Hugging Face Hub is reachable: answered in seconds,
once per address.

`datasets` and `transformers` retry an unreachable Hub for half a minute before failing with a
long traceback; a loader that asks here fails instead with one line that says what to do.
HF_ENDPOINT and HF_HUB_OFFLINE are read as Hugging Face reads them (settings.HubConfig).
"""

import functools
import socket
from urllib.parse import urlparse

from env import UserError
from settings import HubConfig


def endpoint():
    """Return the Hub's address: HF_ENDPOINT when set, else https://huggingface.co."""
    return HubConfig.from_env().hf_endpoint


def reachable(url=None, timeout=5.0):
    """Return True when a TCP connection to the host of `url` (default: the Hub's endpoint) opens
    within `timeout` seconds; always False under HF_HUB_OFFLINE. Each address is asked once."""
    config = HubConfig.from_env()
    return not config.offline and answers(url or config.hf_endpoint, timeout)


@functools.cache
def answers(url, timeout):
    """Return True when a TCP connection to the host of `url` opens within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def require(what, offline_hint, url=None):
    """Raise a UserError naming `what` could not be downloaded and `offline_hint`, when `url`
    (default: the Hub's endpoint) is unreachable."""
    if not reachable(url):
        host = urlparse(url or endpoint()).hostname
        raise UserError(f"cannot reach {host} to download {what}: {offline_hint}")
