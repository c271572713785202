"""Control plane: a watchable Kubernetes-compatible apiserver (store, REST, controllers)."""
