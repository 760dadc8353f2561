"""Which model a call used: the reference the ledger gives, and its label value.

The ``model`` column names the model; where it is NULL, the raw provider string does, after its
family prefix (``max/claude-opus-4``, ``codex:gpt-5-codex``). The label is normalised so that
one model is one series whatever spelling the platform logged: lower case, without the
provider's routing (Bedrock's region and vendor prefixes, ``-v1:0`` suffixes) and without a
release date (``-20250514``, ``-2025-05-14``, ``@20250514``).
"""

from __future__ import annotations

import re
from functools import lru_cache

# A family prefix: everything through the first "/" (bedrock/..., openrouter/...), or a plain
# word and ":" (codex:gpt-5). A Bedrock id's own ":" (us.anthropic.claude-...-v1:0) is not one.
_FAMILY_PREFIX = re.compile(r"^[^/]*/|^[a-z0-9_-]+:(?=[a-z])")
_VERSION = re.compile(r"-v\d+(?::\d+)?$")
_REGION = re.compile(r"^(?:us|eu|apac|ap|global|jp|au|ca|us-gov)\.")
_VENDOR = re.compile(r"^[a-z]+\.(?=[a-z])")
_DATE = re.compile(r"(?:[-@]\d{8}|-\d{4}-\d{2}-\d{2})$")


def model_ref(provider: str | None, model: str | None) -> str | None:
    """The model a call names, as the price catalogue is asked for it (lower case)."""
    if model is not None and model.strip():
        return model.strip().lower()
    if provider is None or not provider.strip():
        return None
    raw = provider.strip().lower()
    stripped = _FAMILY_PREFIX.sub("", raw, count=1)
    return stripped or raw


@lru_cache(maxsize=4096)
def model_name(ref: str | None) -> str | None:
    """The normalised model name of a reference (None: the call names no model)."""
    if ref is None:
        return None
    name = ref.rsplit("/", 1)[-1]
    name = _VERSION.sub("", name)
    name = _REGION.sub("", name)
    name = _VENDOR.sub("", name)
    name = _DATE.sub("", name)
    return name or None


@lru_cache(maxsize=4096)
def model_label(provider: str | None, model: str | None) -> str | None:
    """The normalised model name of a ledger row's provider and model."""
    return model_name(model_ref(provider, model))
