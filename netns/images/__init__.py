"""Built-in images: the programs a pod's `image` names. Tests, the tracer and the bench rely on
their one-line contract: `pod=<name> ip=<pod IP> client=<client ip:port as seen>`.

Both are one small C epoll server, netns/images/kpx-echo.c (kpx/http is `kpx-echo --http`):
~1 ms start-up and ~0.3 MiB RSS per pod, where a Python asyncio/uvloop server measured ~170 ms
and ~24 MiB (500 pods would have needed 12 GiB). The agent turns image + args into a container
argv with `image_argv`; an unknown image raises UnknownImage, whose message is the pod's
failure reason.
"""

from __future__ import annotations

# image name -> argv prefix after the binary
IMAGES: dict[str, list[str]] = {
    "kpx/echo": [],
    "kpx/http": ["--http"],
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
    extra = IMAGES.get(normalize(image))
    if extra is None:
        known = ", ".join(sorted(IMAGES))
        raise UnknownImage(f"image {image!r} is not built in (kpx runs {known}, or give the pod a command)")
    from netns.cbuild import binary

    return [binary("kpx-echo"), *extra, *(args or [])]
