"""Store URLs: which backend a URL names, how to open it, and how to print it safely.

Supported: plain local paths, ``file://``, ``memory://`` (fsspec's process-wide memory
filesystem, for tests), ``s3://`` (s3fs) and ``gs://`` (gcsfs, optional extra). Credentials and
endpoints come from the standard places (``AWS_*`` variables including ``AWS_ENDPOINT_URL``,
profiles, instance roles) or from explicit ``storage_options``; neither is ever printed.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from repscope.errors import InputError, RepscopeError, StorageError

# Schemes served through fsspec, with the module that implements them and the extra to install.
_FSSPEC_SCHEMES = {
    "memory": (None, None),
    "s3": ("s3fs", "repscope[s3]"),
    "s3a": ("s3fs", "repscope[s3]"),
    "gs": ("gcsfs", "repscope[gcs]"),
    "gcs": ("gcsfs", "repscope[gcs]"),
}

# user:password@ in the authority part of a URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
# Query parameters that carry secrets in presigned or token URLs (X-Amz-Signature, sig, key...).
_SECRET_PARAM = re.compile(
    r"(?P<name>(?:[?&;]|\b)(?:X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|sig|signature|key|secret|token|"
    r"password|passwd|access_token|credential|sas|aws_access_key_id|aws_secret_access_key|"
    r"aws_session_token|secret_key|access_key)=)(?P<value>[^&;\s'\"]+)",
    re.IGNORECASE,
)
_MASK = "***"
# Backend messages echoed in errors are cut to this many characters (after redaction).
_MAX_DETAIL = 300


def redact(text_or_url: str, secrets: Iterable[str] = ()) -> str:
    """``text_or_url`` with credentials replaced by ``***``.

    Removes ``user:password@`` from URLs, the values of secret-bearing query parameters
    (``X-Amz-*``, ``sig``, ``key=``, ``token=``...), the user and password of such URLs
    wherever else they recur in the text, and every string in ``secrets`` (pass
    :func:`secrets_of` the URL and storage options, so that a backend message that echoes
    one is cleaned too).
    """
    # Shorter strings would mask parts of ordinary words.
    masked = {s for s in [*secrets, *userinfo_parts(str(text_or_url))] if len(s) >= 3}
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{_MASK}@", str(text_or_url))
    text = _SECRET_PARAM.sub(lambda m: f"{m['name']}{_MASK}", text)
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted(masked, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def userinfo_parts(url: str) -> list[str]:
    """The user and password of every ``scheme://user:password@`` in ``url``, as written
    and percent-decoded: a backend that does not understand them repeats them in its
    messages (as part of a bucket name, say), so they are masked wherever they recur."""
    parts = []
    for match in re.finditer(r"[A-Za-z][A-Za-z0-9+.-]*://([^/@\s]*)@", str(url)):
        for part in match.group(1).split(":", 1):
            parts += [part, urllib.parse.unquote(part)]
    return [p for p in parts if p]


def secrets_of(url: str, storage_options: Any = None) -> list[str]:
    """Everything to mask in messages about ``url`` (pass it to :func:`redact`):
    storage-option values and the URL's user and password."""
    return option_values(storage_options) + userinfo_parts(url)


def option_values(options: Any) -> list[str]:
    """Every string (and number) inside nested storage options: candidates to redact."""
    if isinstance(options, dict):
        return [v for value in options.values() for v in option_values(value)]
    if isinstance(options, list | tuple | set):
        return [v for value in options for v in option_values(value)]
    if isinstance(options, str | int | float) and not isinstance(options, bool):
        return [str(options)]
    return []


def scheme_of(url: str) -> str:
    """The lower-case scheme of ``url``, ``"file"`` for plain paths (also Windows drives)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return match.group(1).lower() if match else "file"


def local_path(url: str) -> Path:
    """The filesystem path of a plain path or ``file://`` URL."""
    return Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()


def open_zarr_store(url: str, storage_options: dict | None = None) -> Any:
    """A zarr ``Store`` for ``url``: ``LocalStore`` for local paths, ``FsspecStore`` otherwise.

    Raises :class:`InputError` for an unsupported scheme, storage options on a local path, or
    a missing optional backend (with the extra to install).
    """
    from zarr.storage import FsspecStore, LocalStore

    if not isinstance(url, str) or not url.strip():
        raise InputError(f"store URL must be a non-empty string, got {redact(repr(url))}")
    scheme = scheme_of(url)
    if "::" in url:
        raise InputError(
            f"unsupported store URL {redact(url)[:200]}: chained fsspec URLs (a::b) are not "
            "supported; give the store's own URL"
        )
    if scheme == "file":
        if storage_options:
            raise InputError(
                f"storage options are not used for local store {redact(url)}; remove them"
            )
        return LocalStore(local_path(url))
    if scheme not in _FSSPEC_SCHEMES:
        supported = "local paths, file://, memory://, s3://, gs://"
        raise InputError(f"unsupported store URL {redact(url)[:200]}: supported are {supported}")
    if _USERINFO.match(url):
        # s3fs and gcsfs would take "user:password@bucket" for a bucket name.
        raise InputError(
            f"store URL {redact(url)[:200]}: credentials in the URL are not supported for "
            f"{scheme}://; pass them as storage options (key, secret) or through the "
            "backend's environment variables (AWS_ACCESS_KEY_ID, ...)"
        )
    if scheme != "memory" and not url.split("://", 1)[1].strip("/"):
        raise InputError(f"store URL {redact(url)[:200]} names no bucket: use {scheme}://BUCKET/PATH")
    module, extra = _FSSPEC_SCHEMES[scheme]
    if module is not None and importlib.util.find_spec(module) is None:
        raise InputError(
            f"store URL {redact(url)} needs the '{module}' package: pip install '{extra}'"
        )
    with storage_errors(url, storage_options):
        return FsspecStore.from_url(url, storage_options=dict(storage_options or {}))


def _is_backend_error(exc: BaseException) -> bool:
    """True for errors raised by storage backends (I/O, botocore, aiohttp, google)."""
    if isinstance(exc, RepscopeError):
        return False
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in {"botocore", "aiobotocore", "aiohttp", "google", "gcsfs"}


@contextmanager
def storage_errors(url: str, storage_options: dict | None = None) -> Iterator[None]:
    """Turn backend failures into :class:`StorageError` with every secret redacted.

    The original exception is not chained (``from None``): botocore messages and tracebacks
    can carry request URLs or keys, and chained tracebacks end up in Ray's logs.
    """
    try:
        yield
    except Exception as exc:
        if not _is_backend_error(exc):
            raise
        secrets = secrets_of(url, storage_options)
        detail = " ".join(redact(f"{type(exc).__name__}: {exc}", secrets).split())
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 3] + "..."
        raise StorageError(f"storage failure at {redact(url, secrets)}: {detail}") from None
