"""Rendering and installing the service-manager files for the current user.

The templates live in ``systemd/`` (installed as ``stigmer.broker.units``);
``@EXEC@`` becomes the installed console script and ``@HOME@`` the broker's
home, quoted for the file they land in. Nothing here runs systemctl or
launchctl: the CLI tells the user the one command to enable what was written.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from importlib.resources import files
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = ["LAUNCHD", "SYSTEMD", "ServiceFile", "console_script", "default_manager",
           "disable_hint", "enable_hint", "install", "render", "target_dir", "uninstall"]

SYSTEMD = "systemd"
LAUNCHD = "launchd"
_SYSTEMD_FILES = ("stigmer-broker.socket", "stigmer-broker.service")
_PLIST = "dev.stigmer.broker.plist"


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceFile:
    path: Path
    content: str


def default_manager(platform: str = sys.platform) -> str:
    """launchd on macOS, systemd elsewhere."""
    return LAUNCHD if platform == "darwin" else SYSTEMD


def target_dir(manager: str, user_home: Path, xdg_config_home: str | None) -> Path:
    if manager == LAUNCHD:
        return user_home / "Library" / "LaunchAgents"
    base = Path(xdg_config_home) if xdg_config_home else user_home / ".config"
    return base / "systemd" / "user"


def _systemd_quote(value: str) -> str:
    if all(c.isalnum() or c in "/._-+:@" for c in value):
        return value.replace("%", "%%")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render(manager: str, *, exec_path: str, home: Path, user_home: Path,
           xdg_config_home: str | None = None) -> list[ServiceFile]:
    """Return the files for ``manager`` with paths filled in, and where they go."""
    directory = target_dir(manager, user_home, xdg_config_home)
    templates = files("stigmer.broker.units")
    if manager == LAUNCHD:
        text = templates.joinpath(_PLIST).read_text(encoding="utf-8")
        text = text.replace("@EXEC@", escape(exec_path)).replace("@HOME@", escape(str(home)))
        return [ServiceFile(directory / _PLIST, text)]
    out = []
    for name in _SYSTEMD_FILES:
        text = templates.joinpath(name).read_text(encoding="utf-8")
        text = text.replace("@EXEC@", _systemd_quote(exec_path))
        text = text.replace("@HOME@", _systemd_quote(str(home)))
        out.append(ServiceFile(directory / name, text))
    return out


def install(service_files: list[ServiceFile]) -> None:
    """Write each file atomically (0644: unit files hold no secret)."""
    for f in service_files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.path.with_name(f".{f.path.name}.tmp")
        tmp.write_text(f.content, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, f.path)


def uninstall(manager: str, user_home: Path, xdg_config_home: str | None = None) -> list[Path]:
    """Remove the files ``install`` writes; return the ones that were there."""
    directory = target_dir(manager, user_home, xdg_config_home)
    names = (_PLIST,) if manager == LAUNCHD else _SYSTEMD_FILES
    removed = []
    for name in names:
        path = directory / name
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def enable_hint(manager: str, service_files: list[ServiceFile]) -> str:
    """Return the one command that enables what ``install`` wrote."""
    if manager == LAUNCHD:
        return f"launchctl bootstrap gui/{os.getuid()} {service_files[0].path}"
    return "systemctl --user daemon-reload && systemctl --user enable --now stigmer-broker.socket"


def disable_hint(manager: str, user_home: Path) -> str:
    if manager == LAUNCHD:
        return f"launchctl bootout gui/{os.getuid()}/dev.stigmer.broker"
    return ("systemctl --user disable --now stigmer-broker.socket stigmer-broker.service && "
            "systemctl --user daemon-reload")


def console_script() -> str:
    """The installed ``stigmer-broker`` beside this interpreter (else the one on PATH)."""
    beside = Path(sys.executable).parent / "stigmer-broker"
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which("stigmer-broker")
    return found or str(beside)

