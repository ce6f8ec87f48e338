"""Runtime options: one frozen dataclass, built from flags and the environment.

This is the only module that reads the environment, so every other module receives
its configuration explicitly and tests can build a Settings by hand.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from .fdstore import listened_fds
from .tokens import TokenSource

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_BLOCK_SIZE = 16 * 1024 * 1024
DEFAULT_MEMORY = 128 * 1024 * 1024       # block buffers: downloads, loads, blocks kept for readers


@dataclass(frozen=True)
class Settings:
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = field(default=None, repr=False)  # never printed; fixed (HF_TOKEN, or given)
    token_file: Path | None = None       # without a fixed token: read, and re-read when it changes (tokens.py)
    cache_dir: Path = field(default_factory=lambda: _expand("~/.cache/lamina-llm-cache"))
    hf_hub_cache: Path = field(default_factory=lambda: _expand("~/.cache/huggingface/hub"))
    block_size: int = DEFAULT_BLOCK_SIZE
    memory: int = DEFAULT_MEMORY         # bytes of block buffers (at least two blocks' worth are used)
    max_size: int | None = None          # bytes; None = bounded by free space only
    min_free_fraction: float = 0.05      # keep this share of the disk free
    read_ahead_kb: int = 1024
    allow_other: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 15.0           # a stalled body is abandoned after this
    read_deadline: float = 60.0          # a FUSE read gets its bytes or EIO within this
    max_retries: int = 5
    fetch_workers: int = 8               # blocks fetched at once, all files together
    max_in_flight: int = 32              # HTTP requests in flight per origin, at most (concurrency.py)
    part_size: int = 2 * 1024 * 1024     # the smallest part a block is split into (parts.py)
    offline: bool = False
    passthrough: bool = True             # serve complete, verified files by FUSE passthrough
    local_passthrough: bool = True       # and local models' files (else the daemon checks each read)
    frozen: bool = False                 # refuse to start when models.lock and models.yaml disagree
    progress_bars: bool = True           # HF_HUB_DISABLE_PROGRESS_BARS turns pull's progress off
    notify_socket: str | None = None     # systemd's NOTIFY_SOCKET (Type=notify)
    watchdog_usec: int | None = None     # systemd's WATCHDOG_USEC (WatchdogSec=)
    watchdog_pid: int | None = None      # systemd's WATCHDOG_PID: the process it watches
    stored_fds: dict = field(default_factory=dict)   # systemd's LISTEN_FDS by LISTEN_FDNAMES (fdstore.py)
    proxies: tuple = field(default=(), repr=False)   # (scheme or "no", value) pairs; may hold credentials
    ca_bundle: Path | None = None        # the CAs TLS trusts (file or directory); None: the system's (tls.py)


def _token_from_env(env):
    """The fixed token of the environment (huggingface_hub's first choice), or None."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(name):
            return env[name].strip()
    return None


def _token_file_from_env(env):
    """The token file huggingface_hub reads when no token is in the environment."""
    return _expand(env.get("HF_TOKEN_PATH") or _hf_home(env) / "token")


def _proxies_from_env(env):
    """Proxy settings as urllib.request.getproxies_environment reads them, from `env`.

    Lower-case names win over upper-case ones, and a CGI-set HTTP_PROXY is ignored
    (it can come from a client's "Proxy:" header): what requests and curl do too.
    """
    proxies = {}
    for name, value in env.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = value
    if "REQUEST_METHOD" in env:
        proxies.pop("http", None)
    for name, value in env.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return tuple(sorted(proxies.items()))


def _expand(path) -> Path:
    """`path` with ~ expanded; unexpanded when the user has no home (a systemd DynamicUser
    without HOME): every path that matters can then still be given explicitly."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _integer(text):
    return int(text) if text and text.strip().isdigit() else None


def _ca_bundle_from_env(env):
    """The CA bundle the environment names, as ssl/httpx (SSL_CERT_FILE), requests and curl read it."""
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_DIR"):
        if env.get(name):
            return _expand(env[name])
    return None


def _hf_home(env):
    default = _expand(env.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return _expand(env.get("HF_HOME", default))


def default_cache_dir(env=None):
    env = os.environ if env is None else env
    base = _expand(env.get("XDG_CACHE_HOME", "~/.cache"))
    return base / "lamina-llm-cache"


def token_source(settings: Settings) -> TokenSource:
    """Where requests get the token they send: the fixed one, or the token file as it is now."""
    return TokenSource(settings.token, settings.token_file)


def from_environment(env=None, **overrides):
    """Settings from `env` (default os.environ), with explicit flag values on top."""
    env = os.environ if env is None else env
    values = {
        "endpoint": (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        "token": _token_from_env(env),
        "token_file": _token_file_from_env(env),
        "cache_dir": default_cache_dir(env),
        "hf_hub_cache": _expand(env.get("HF_HUB_CACHE", _hf_home(env) / "hub")),
        "offline": env.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes"),
        "progress_bars": env.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() not in ("1", "ON", "YES", "TRUE"),
        "proxies": _proxies_from_env(env),
        "notify_socket": env.get("NOTIFY_SOCKET") or None,
        "watchdog_usec": _integer(env.get("WATCHDOG_USEC")),
        "watchdog_pid": _integer(env.get("WATCHDOG_PID")),
        "stored_fds": listened_fds(env.get("LISTEN_FDS"), env.get("LISTEN_PID"), env.get("LISTEN_FDNAMES")),
        "ca_bundle": _ca_bundle_from_env(env),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["token"] is not None:
        values["token_file"] = None        # a fixed token (HF_TOKEN, or given) wins over the file
    if isinstance(values["endpoint"], str):
        values["endpoint"] = values["endpoint"].rstrip("/")
    values["cache_dir"] = _expand(values["cache_dir"])
    return Settings(**values)
