"""What users write by hand, read strictly: YAML manifests, env_specs and .env files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from stigmer.broker.config import Paths
from stigmer.broker.manifests import read_env_file, read_env_spec, read_environment_manifests
from stigmer.broker.protocol import Variable
from stigmer.broker.protocol.errors import InvalidArgument

HEAD = "apiVersion: ai.stigmer.agentic/v1\nkind: Environment\nmetadata: {name: prod}\n"


def manifest(data: str) -> str:
    return HEAD + "spec:\n  data:\n" + data


def test_values_stay_as_written() -> None:
    # YAML 1.1 would read these as 668, 750, 31, 1.1, True and a date.
    [spec] = read_environment_manifests(manifest(
        "    A: {value: 01234}\n    B: {value: 12:30}\n    C: {value: 0x1F}\n"
        "    D: {value: 1.10}\n    E: {value: yes}\n    F: {value: 2001-12-14}\n"
        "    G: {value: 8080, is_secret: true}\n"), "m.yaml")
    assert {k: v.value for k, v in spec.data.items()} == {
        "A": "01234", "B": "12:30", "C": "0x1F", "D": "1.10", "E": "yes", "F": "2001-12-14",
        "G": "8080"}
    assert spec.data["G"] == Variable(value="8080", is_secret=True)


@pytest.mark.parametrize(("data", "message"), [
    ("    A: {value: true}\n", "document 1: spec.data.A.value must be a string, not bool: "
                             "quote it"),
    ("    A: {value: null}\n", "spec.data.A.value must be a string, not null"),
    ("    A: {value: '1', is_secret: yes}\n", "spec.data.A.is_secret must be true or false"),
    ("    A: {value: '1', colour: red}\n", "unknown field 'colour' in spec.data.A"),
    ("    A: [1]\n", "spec.data.A must be a mapping"),
    ("    A: {is_secret: true}\n", "spec.data.A.value is required"),
    ("    A: {value: a}\n    B: {value: b}\n    A: {value: c}\n",
     "m.yaml: not valid YAML at line 8: duplicate key 'A'"),
    ("    A: &x {value: a}\n    B: *x\n", "line 7: aliases (*name) are not allowed"),
    # issue 23: a key with a newline made the error reader assert (a traceback)
    ("    A: {value: '1', \"col\\nour\": red}\n", "unknown field 'col\\nour' in spec.data.A"),
    ("    A: {value: '1', \"\\e[2J\": red}\n", "unknown field '\\x1b[2J' in spec.data.A"),
    ("    \"A\\nB\": {value: '1'}\n", "variable name 'A\\nB' in m.yaml document 1 is not"),
])
def test_manifest_mistakes_name_the_field_or_line(data: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        read_environment_manifests(manifest(data), "m.yaml")
    assert message in info.value.message
    assert "`" not in info.value.message and "$" not in info.value.message
    assert len(info.value.message.splitlines()) == 1


def test_a_duplicate_top_level_key_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="line 4: duplicate key 'metadata'"):
        read_environment_manifests(HEAD + "metadata: {name: other}\n", "m.yaml")


def test_env_spec_is_read_as_written() -> None:
    spec = read_env_spec("X: {value: 0755}\nY:\nZ: {description: needed}\n", "s.yaml")
    assert spec["X"].value == "0755" and spec["Y"].value is None
    assert spec["Z"].description == "needed"
    agent = read_env_spec("kind: Agent\nspec: {env_spec: {data: {X: {value: 1.10}}}}\n", "a")
    assert agent["X"].value == "1.10"
    with pytest.raises(InvalidArgument, match=r"--spec a: unknown field 'valu' in "
                                              r"spec\.env_spec\.data\.X"):
        read_env_spec("kind: Agent\nspec: {env_spec: {data: {X: {valu: 1}}}}\n", "a")
    with pytest.raises(InvalidArgument, match="line 2: duplicate key 'X'"):
        read_env_spec("X: {}\nX: {}\n", "a")


@pytest.mark.parametrize(("text", "message"), [
    ("A=1\nthis is not an assignment\nB=2\n", "line 2 is not KEY=VALUE; nothing was imported"),
    ("A=1\nB\n", "line 2 has no '=' (write KEY=VALUE)"),
    ("A=1\n# note\nA=2\n", "line 3 sets A again (first set on line 1)"),
    ("A=1\n1X=2\n", "line 2 has no valid variable name before '='"),
])
def test_a_bad_env_file_is_refused_whole(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "x.env"
    file.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        read_env_file(str(file))
    assert message in info.value.message


def test_env_file_errors_say_what_the_path_is(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="is a directory"):
        read_env_file(str(tmp_path))
    with pytest.raises(InvalidArgument, match="no such file"):
        read_env_file(str(tmp_path / "missing.env"))
    (tmp_path / "bin.env").write_bytes(b"A=\xff\n")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        read_env_file(str(tmp_path / "bin.env"))
    (tmp_path / "ok.env").write_text("export A='x y'\n# c\nB=\"q\\nr\"\n")
    assert read_env_file(str(tmp_path / "ok.env")) == {"A": "x y", "B": "q\nr"}


@pytest.mark.parametrize("key", ['"col\\nour": red', '"\\e]0;x\\a": red'])
def test_apply_with_a_control_character_in_a_key_is_one_line_not_a_traceback(
        paths: Paths, key: str) -> None:
    """Issue 23: ``apply -f`` with a newline in a key died with a traceback."""
    paths.home.mkdir(parents=True)
    file = paths.home / "m.yaml"
    file.write_text(manifest(f"    A: {{value: S3CRET-VALUE, {key}}}\n"))
    result = run_cli(paths, "apply", "-f", str(file))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("stigmer-broker: error: ")
    assert "unknown field" in result.stderr and "spec.data.A" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "S3CRET" not in result.stderr
