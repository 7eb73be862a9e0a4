"""Hiding secrets in what is printed or logged: URL passwords and secret query parameters.

``redact_url`` for one URL (``Settings.printable``, ``repr(Settings)``, configuration errors);
``redact_text`` for free text that may quote URLs (driver errors, every JSON log line).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "redact_text", "redact_url"]

REDACTED = "***"
# Query parameters that carry a secret (libpq's password, redis-py's password, tokens).
_SECRET_QUERY = re.compile(r"pass|secret|token", re.IGNORECASE)
# ``scheme://user:password@`` anywhere in a text (a driver's error message, a log line).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):(?P<pw>[^\s@/]*)@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&][^=&\s]*(?:pass|secret|token)[^=&\s]*=)[^&\s]*", re.I)


def redact_url(url: str) -> str:
    """``url`` with its password (and secret query parameters) replaced by ``***``; safe to
    print or log. Anything that does not parse as a URL goes through :func:`redact_text`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*/:"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` and ``?password=...`` in a free text, with the secret
    replaced by ``***`` (for error messages and log lines that may quote a URL)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)
