"""Storage backends behind one interface (base.Store): SQLite (embedded default) and etcd v3."""
