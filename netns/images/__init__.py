"""Built-in images: the programs a pod's `image` names. Tests, the tracer and the bench rely on
their one-line contract: `pod=<name> ip=<pod IP> client=<client ip:port as seen>`.

The agent turns image + args into a container argv with `image_argv`; an unknown image raises
UnknownImage, whose message is the pod's failure reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent

# image name -> the program's file; run with `python -I` (no site-specific env, fast start-up).
IMAGES: dict[str, Path] = {
    "kpx/echo": _HERE / "echo_server.py",
    "kpx/http": _HERE / "http_server.py",
}


class UnknownImage(ValueError):
    """The pod names an image kpx does not have built in."""


def normalize(image: str) -> str:
    """'kpx/echo', 'kpx/echo:latest', 'docker.io/kpx/echo:1.0' -> 'kpx/echo'."""
    name = image.strip()
    if "@" in name:
        name = name.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    for prefix in ("docker.io/", "registry.k8s.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def image_argv(image: str, args: list[str] | None = None) -> list[str]:
    """argv running `image` with container `args`; UnknownImage for anything not built in."""
    prog = IMAGES.get(normalize(image))
    if prog is None:
        known = ", ".join(sorted(IMAGES))
        raise UnknownImage(f"image {image!r} is not built in (kpx runs {known}, or give the pod a command)")
    return [sys.executable, "-I", str(prog), *(args or [])]
