"""Userspace mode: portal rules (pure render) and the socket data path (one epoll thread)."""
