"""One module per proxy mode; each subclasses base.Mode. `MODES` maps --proxy-mode to the module."""

MODES = {
    "iptables": "proxy.modes.iptables",
    "nftables": "proxy.modes.nftables",
    "ipvs": "proxy.modes.ipvs",
    "userspace": "proxy.modes.userspace",
}
