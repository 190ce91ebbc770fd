"""Where a store lives: a local folder or an S3-compatible prefix (``s3://bucket/prefix``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hookpoints.errors import UserError

#: Environment variables passed to Delta Lake's object store for ``s3://`` stores.
_S3_ENV = {
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_REGION": "AWS_REGION",
    "AWS_DEFAULT_REGION": "AWS_REGION",
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN": "AWS_SESSION_TOKEN",
    "AWS_ALLOW_HTTP": "AWS_ALLOW_HTTP",
}


@dataclass(frozen=True)
class StoreLocation:
    """The root URI of a store plus the options Delta Lake needs to reach it."""

    uri: str
    storage_options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, where: str | Path, storage_options: dict[str, str] | None = None) -> StoreLocation:
        if not isinstance(where, str | Path):  # None made (with create=True) a store in a folder named "None"
            raise UserError(f"a store is a folder or an s3://bucket/prefix URI, not {type(where).__name__}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise UserError(f"storage_options must be a dict of option -> value, not {type(storage_options).__name__}")
        text = str(where)
        if not text.strip():
            raise UserError("the store path is empty: give a folder or an s3://bucket/prefix URI")
        scheme, _, rest = text.partition("://")
        if scheme in ("s3", "s3a") and not rest.split("/", 1)[0]:
            raise UserError(f"store URI {text!r} names no bucket: give s3://BUCKET or s3://BUCKET/PREFIX")
        if "://" in text:
            options = {}
            if text.startswith("s3://"):
                options = {key: os.environ[env] for env, key in _S3_ENV.items() if env in os.environ}
                endpoint = options.get("AWS_ENDPOINT_URL", "")
                if endpoint.startswith("http://"):
                    options.setdefault("AWS_ALLOW_HTTP", "true")
            options.update(storage_options or {})
            return cls(text.rstrip("/"), options)
        return cls(str(Path(text).expanduser().resolve()), dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    def table_uri(self, table: str) -> str:
        return f"{self.uri}/{table}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_S3_ERROR = re.compile(r"<Code>(?P<code>[^<]+)</Code>\s*<Message>(?P<message>[^<]+)</Message>")


_BACKTRACE = re.compile(r"\s+\d+: (<unknown>|\S+ at ).*$", re.S)


def without_backtrace(error: BaseException) -> str:
    """An error's message on one line, without the Rust backtrace delta-rs appends (``0: <unknown> ...``)."""
    return " ".join(_BACKTRACE.sub("", _ANSI.sub("", str(error))).split())[:300]


def storage_error(error: Exception) -> str:
    """The gist of an object-store error (delta-rs nests causes over many coloured lines) on one line."""
    text = _ANSI.sub("", str(error))
    s3 = _S3_ERROR.search(text)
    if s3:
        return f"{s3['message']} ({s3['code']})"
    causes = [" ".join(part.split()) for part in text.split("\u21b3")]  # delta-rs marks each cause with ↳
    causes = [cause for cause in causes if cause]
    return "; ".join(causes[-2:])[:300] if causes else type(error).__name__
