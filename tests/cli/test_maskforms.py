"""Encoded forms of a secret are masked too (every masker: `run` and `mcp proxy`), and a
secret shorter than the minimum is not masked, which `run` and `status` say."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from urllib.parse import quote, quote_plus

import pytest
from conftest import cli_env, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmer.broker.cli.maskforms import MIN_SECRET_LENGTH, mask_patterns
from stigmer.broker.cli.masking import MASK, Masker
from stigmer.broker.config import Paths
from stigmer.client import Client, variables


@pytest.fixture
def store() -> None:
    """SQLite is enough: masking happens in the CLI, not in the store."""
    return None


def masked(secret: str, text: bytes) -> bytes:
    masker = Masker(mask_patterns([secret]))
    return masker.feed(text) + masker.flush()


@settings(max_examples=200, deadline=None)
@given(secret=st.text(min_size=MIN_SECRET_LENGTH, max_size=40).filter(
           lambda s: "\0" not in s and len(s.strip()) >= MIN_SECRET_LENGTH),
       before=st.binary(max_size=5), after=st.binary(max_size=5))
def test_base64_hex_percent_and_json_forms_are_masked_wherever_the_secret_starts(
        secret: str, before: bytes, after: bytes) -> None:
    data = before + secret.encode() + after
    encoded = [base64.b64encode(data), base64.urlsafe_b64encode(data),
               data.hex().encode(), data.hex().upper().encode(),
               quote(secret, safe="").encode(), quote_plus(secret).encode(),
               json.dumps(secret).encode(), json.dumps(secret, ensure_ascii=False).encode(),
               json.dumps(json.dumps({"v": secret})).encode()]
    for form in encoded:
        assert MASK in masked(secret, form), form


def test_each_line_of_a_multi_line_secret_is_masked_on_its_own() -> None:
    pem = "-----BEGIN KEY-----\nAAAAsentinel1111\nBBBBsentinel2222\n\n-----END KEY-----"
    out = masked(pem, b"line: BBBBsentinel2222\r\nand AAAAsentinel1111 too\n")
    assert out == b"line: " + MASK + b"\r\nand " + MASK + b" too\n"


def test_a_secret_under_the_minimum_length_is_not_masked() -> None:
    short = "x" * (MIN_SECRET_LENGTH - 1)
    assert mask_patterns(["1", "yes", short]) == set()
    assert masked(short, short.encode()) == short.encode()
    assert masked("x" * MIN_SECRET_LENGTH, b"x" * MIN_SECRET_LENGTH) == MASK


SECRET = "sentinel-run-secret-2c9d"


def test_run_masks_encoded_forms_and_names_the_short_secrets(cli_broker: Paths) -> None:
    with Client(cli_broker.socket) as client:
        token = client.create_context("forms", runtime=variables(
            {}, {"LONG": SECRET, "PIN": "1234"})).token
    assert token
    script = ("import base64, os\n"
              "s = os.environ['LONG'].encode()\n"
              "print(base64.b64encode(b'x' + s).decode())\n"
              "print(base64.urlsafe_b64encode(b'xy' + s).decode())\n"
              "print(s.hex(), s.hex().upper())\n"
              "print(os.environ['PIN'])\n")
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", "--", sys.executable,
                             "-c", script], capture_output=True, text=True, timeout=60,
                            env=cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(MASK.decode() in line for line in lines[:3]), lines
    assert SECRET.encode().hex() not in result.stdout
    assert lines[3] == "1234"  # under the minimum: passes, and run says so by name
    assert f"not masked, shorter than {MIN_SECRET_LENGTH} characters: PIN" in result.stderr
    assert "1234" not in result.stderr


def test_status_states_the_minimum(cli_broker: Paths) -> None:
    human = run_cli(cli_broker, "status", check=True).stdout
    assert f"secrets shorter than {MIN_SECRET_LENGTH} characters are not masked" in human
    data = json.loads(run_cli(cli_broker, "status", "--json", check=True).stdout)
    assert data["mask_min_length"] == MIN_SECRET_LENGTH
