"""kpx: a kube-proxy reimplementation on a netns lab. The `kpx` CLI lives in kpx.cli."""

__version__ = "0.1.0"
