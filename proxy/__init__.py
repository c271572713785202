"""kube-proxy: informers, change tracking, the shared model, one module per mode."""
