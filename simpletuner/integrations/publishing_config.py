"""Reading ``publishing_config``: where the finished model is uploaded besides the Hugging Face Hub.

The value is inline JSON, a path to a JSON file, or (from the Python API) a
dict or list. One entry or a list of entries; each names its ``provider``.
Built providers speak the S3 API through boto3::

    {"provider": "s3",                 # or "backblaze_b2" (S3 API, endpoint_url required)
     "bucket": "my-models",            # required
     "region": "us-east-1",            # optional
     "access_key": "...",              # optional with secret_key; otherwise boto3 looks in
     "secret_key": "...",              #   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, ...
     "endpoint_url": "https://...",    # optional for s3 (MinIO, R2, ...), required for backblaze_b2
     "base_path": "runs/2024",         # optional prefix inside the bucket
     "public_base_url": "https://cdn.example.com/models"}  # optional: report https URIs, not s3://

``azure_blob`` (alias ``azure``) and ``dropbox`` are known providers that are
not implemented yet; they are refused when the configuration is checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from simpletuner.config.errors import ConfigError

S3_PROVIDERS = ("s3", "backblaze_b2")
NOT_IMPLEMENTED = ("azure_blob", "azure", "dropbox")
S3_KEYS = ("provider", "bucket", "region", "access_key", "secret_key", "endpoint_url", "base_path", "public_base_url")
EXAMPLE = '[{"provider": "s3", "bucket": "my-models", "base_path": "runs"}]'


@dataclass(frozen=True)
class S3Target:
    """One S3-API destination (AWS S3, MinIO, Cloudflare R2, Backblaze B2, ...)."""

    provider: str
    bucket: str
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    endpoint_url: str | None = None
    base_path: str = ""
    public_base_url: str | None = None

    def uri(self, key: str) -> str:
        """Where an uploaded key can be found: under public_base_url when set, else s3://bucket/key."""
        if self.public_base_url:
            return f"{self.public_base_url.rstrip('/')}/{key}"
        return f"s3://{self.bucket}/{key}"


def _fail(source: str, problem: str) -> ConfigError:
    return ConfigError("publishing_config", f"publishing_config ({source}): {problem}")


def read_publishing_config(value) -> tuple[list, str]:
    """The raw entries (always a list) and a description of where they came from."""
    if isinstance(value, (dict, list)):
        data, source = value, "the given value"
    else:
        text = str(value).strip()
        source = "inline JSON"
        if not text.startswith(("{", "[")):
            source = text
            if not os.path.isfile(text):
                raise _fail(source, f"no such file. Give the path to a JSON file or inline JSON such as {EXAMPLE}.")
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(source, f"not valid JSON ({exc}). Fix the JSON syntax.") from None
    return (data if isinstance(data, list) else [data]), source


def _optional_text(entry: dict, key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError("publishing_config", f"{where}: {key} must be a string, got {value!r}.")
    return value


def _url(entry: dict, key: str, where: str) -> str | None:
    value = _optional_text(entry, key, where)
    if value is not None and not value.startswith(("http://", "https://")):
        raise ConfigError("publishing_config", f"{where}: {key} must be an http(s) URL, got {value!r}.")
    return value


def _parse_s3(entry: dict, where: str) -> S3Target:
    provider = entry["provider"]
    unknown = sorted(set(entry) - set(S3_KEYS))
    if unknown:
        raise ConfigError("publishing_config", f"{where}: unknown key(s) {', '.join(unknown)} for provider "
                                               f"{provider!r}. Known keys: {', '.join(S3_KEYS)}.")
    bucket = _optional_text(entry, "bucket", where)
    if bucket is None:
        raise ConfigError("publishing_config", f"{where}: the key bucket is missing. Add \"bucket\": "
                                               f"\"<bucket name>\" to the {provider} entry.")
    access_key = _optional_text(entry, "access_key", where)
    secret_key = _optional_text(entry, "secret_key", where)
    if (access_key is None) != (secret_key is None):
        given, missing = ("access_key", "secret_key") if access_key else ("secret_key", "access_key")
        raise ConfigError("publishing_config", f"{where}: {given} is set but {missing} is missing. Give both, or "
                                               f"neither to use the AWS_* environment variables.")
    endpoint_url = _url(entry, "endpoint_url", where)
    if provider == "backblaze_b2" and endpoint_url is None:
        raise ConfigError("publishing_config", f"{where}: the key endpoint_url is missing; backblaze_b2 needs its "
                                               f"S3 endpoint, e.g. \"https://s3.us-west-004.backblazeb2.com\".")
    return S3Target(provider=provider, bucket=bucket, region=_optional_text(entry, "region", where),
                    access_key=access_key, secret_key=secret_key, endpoint_url=endpoint_url,
                    base_path=(_optional_text(entry, "base_path", where) or "").strip("/"),
                    public_base_url=_url(entry, "public_base_url", where))


def _parse_entry(entry, where: str) -> S3Target:
    if not isinstance(entry, dict):
        raise ConfigError("publishing_config", f"{where}: each entry must be a JSON object, got {entry!r}.")
    provider = entry.get("provider")
    if provider is None:
        raise ConfigError("publishing_config", f"{where}: the key provider is missing. Add \"provider\": \"s3\" "
                                               f"(or backblaze_b2).")
    if provider in NOT_IMPLEMENTED:
        raise ConfigError("publishing_config", f"{where}: provider {provider!r} is not implemented yet. Use s3 or "
                                               f"backblaze_b2, or remove this entry.")
    if provider not in S3_PROVIDERS:
        raise ConfigError("publishing_config", f"{where}: provider {provider!r} is unknown. Built providers: "
                                               f"{', '.join(S3_PROVIDERS)}.")
    return _parse_s3(entry, where)


def load_publishing_targets(value) -> list[S3Target]:
    """Targets from the option's value (None or empty: none); raises ConfigError naming the problem and the fix."""
    if value is None or value == "" or value == []:
        return []
    entries, source = read_publishing_config(value)
    if not entries:
        raise _fail(source, f"no providers listed. Add at least one entry such as {EXAMPLE}.")
    return [_parse_entry(entry, f"publishing_config ({source}), entry {number}")
            for number, entry in enumerate(entries, start=1)]
