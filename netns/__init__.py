"""Pods as pause-style netns sandboxes, nodes as netns, the node agent and the lab."""
