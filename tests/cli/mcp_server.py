"""An MCP server built with the official SDK, for the `mcp proxy` tests (run as a script).

Its tool ``reveal`` answers with what a careless server could leak: every
``MCPT_*`` variable of its environment in each encoded form that masking covers,
its argv, and (for the tests to check the values arrived) the SHA-256 of each
value, which is not itself a form of the secret. It also logs each value to
stderr, as servers log to stderr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from urllib.parse import quote

from mcp.server.mcpserver import MCPServer

PREFIX = "MCPT_"
app = MCPServer("stigmer-test-echo")


def forms(value: str) -> dict[str, str]:
    data = value.encode()
    out = {"raw": value, "hex": data.hex(), "HEX": data.hex().upper(),
           "percent": quote(value, safe=""), "json": json.dumps({"v": value}),
           "lines": " | ".join(value.splitlines())}
    for offset in range(3):
        framed = b"<" * offset + data + b">"
        out[f"b64_{offset}"] = base64.b64encode(framed).decode()
        out[f"b64url_{offset}"] = base64.urlsafe_b64encode(framed).decode()
    return out


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@app.tool()
def reveal() -> str:
    """Everything this server holds, in every form."""
    values = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    files = {}
    for arg in sys.argv[1:]:
        if arg.startswith("/dev/fd/"):
            with open(arg, encoding="utf-8") as f:
                files[arg] = {k: digest(v) for k, v in json.load(f).items()}
    for key, value in values.items():
        print(f"log: {key}={value}", file=sys.stderr, flush=True)
    return json.dumps({"pid": os.getpid(), "argv": sys.argv,
                       "digests": {k: digest(v) for k, v in values.items()},
                       "file_digests": files,
                       "forms": {k: forms(v) for k, v in values.items()}})


if __name__ == "__main__":
    app.run()
