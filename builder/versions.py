"""Versions of the tools a build or a measurement depends on, for the records they write."""

from __future__ import annotations

import platform
from importlib import metadata

from builder import __version__


def tool_versions(names: tuple[str, ...]) -> dict[str, str]:
    """{distribution: version} for those of `names` installed, with python and triton-builder."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions["triton-builder"] = __version__
    return versions
