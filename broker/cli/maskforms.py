"""What a masker looks for: each secret in every form it may leave a process in.

A tool that prints a token rarely prints only the token: it base64s it into an
``Authorization`` header, hex-dumps it, percent-encodes it into a URL,
JSON-escapes it into a document, or prints a PEM key one line at a time.
:func:`mask_patterns` turns each secret into all of those strings, so one
:class:`~.masking.Masker` (or one regular expression) masks every form in the
same single pass.

base64 of a secret depends on where it starts in the encoded data: three bytes
become four characters, so a secret that starts one or two bytes into a group
shares its first character with the bytes before it, and its last with the
bytes after it. For each of the three offsets only the characters that encode
the secret's own bits are kept; whatever surrounds the secret, one of the three
is in the output.

A secret shorter than :data:`MIN_SECRET_LENGTH` characters is not masked: "1"
or "yes" masked everywhere would garble every output and tell a reader which
short string is the secret. The same rule keeps short lines of a multi-line
secret (a blank line, ``-----END``) out of the patterns. `run` and `mcp proxy`
name the secrets it leaves unmasked (never their values); `status` states it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stigmer.client import ExecutionContext

__all__ = ["MIN_SECRET_LENGTH", "context_patterns", "mask_patterns"]

#: secrets (and lines of a multi-line secret) shorter than this are not masked
MIN_SECRET_LENGTH = 6


def mask_patterns(secrets: Iterable[str]) -> set[str]:
    """Every string to mask for ``secrets``: each secret of at least
    :data:`MIN_SECRET_LENGTH` characters, its JSON escapes, base64 (standard and
    URL-safe) at each of the three byte offsets, hex (lower and upper), percent
    encodings, and each long-enough line of a multi-line secret. JSON escapes come
    in two depths: JSON text inside a JSON string is common (an MCP tool's result)."""
    patterns: set[str] = set()
    for secret in secrets:
        if len(secret) < MIN_SECRET_LENGTH:
            continue
        patterns.update(_forms(secret))
        for line in secret.splitlines():
            if len(line.strip()) >= MIN_SECRET_LENGTH:
                patterns.update(_json_forms(line))
    patterns.discard("")
    return patterns


def context_patterns(context: ExecutionContext) -> tuple[set[str], list[str]]:
    """The patterns for ``context``'s secrets, and the names of the secrets too short
    to be masked (sorted)."""
    short = sorted(k for k in context if context.is_secret(k)
                   and 0 < len(context[k]) < MIN_SECRET_LENGTH)
    return mask_patterns(context.secret_values()), short


def _forms(secret: str) -> set[str]:
    import base64
    import re
    from urllib.parse import quote, quote_plus

    data = secret.encode()
    forms = _json_forms(secret)
    forms.update((data.hex(), data.hex().upper()))
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            encoded = encode(b"\0" * offset + data).decode()
            # character i carries bits [6i, 6i+6); the secret's are [8*offset, 8*(offset+n))
            first = (8 * offset + 5) // 6
            end = 8 * (offset + len(data)) // 6
            forms.add(encoded[first:end])
    for percent in (quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)):
        forms.add(percent)
        forms.add(re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), percent))
    return forms


def _json_forms(text: str) -> set[str]:
    import json

    ascii_only = json.dumps(text)[1:-1]
    forms = {text, ascii_only, json.dumps(text, ensure_ascii=False)[1:-1]}
    forms.add(ascii_only.replace("/", "\\/"))  # as PHP and some others escape it
    # JSON in a JSON string, as an MCP tool's text result often is
    forms.update([json.dumps(form)[1:-1] for form in forms])
    return forms
