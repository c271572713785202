"""proxy.server's mode loading: missing module, kernel without the feature (IPVS hint), and
constructor options passed only where accepted. Modes here are stand-in modules in sys.modules."""

from __future__ import annotations

import sys
import types
from typing import Any, ClassVar

import pytest

from kpx.errors import UserError
from proxy import modes
from proxy.config import ProxyOptions
from proxy.model import ProxyConfig, ProxyState
from proxy.modes.base import Mode, ModeUnavailable, Plan
from proxy.server import build_mode, load_mode_class

pytestmark = pytest.mark.unit


class _Base(Mode[None]):
    name: ClassVar[str] = "fake"

    def render(self, state: ProxyState, prior: None) -> Plan[None]:
        return Plan(full=True, payload=None, prior=None)

    def apply(self, plan: Plan[None]) -> None:
        return None


class NoKernel(_Base):
    name: ClassVar[str] = "ipvs"

    @classmethod
    def check_kernel(cls) -> None:
        raise ModeUnavailable("the ip_vs module is not available")


class TakesBackend(_Base):
    name: ClassVar[str] = "iptables"

    def __init__(self, config: ProxyConfig, *, backend: str = "auto") -> None:
        super().__init__(config)
        self.backend = backend


@pytest.fixture
def fake_modes(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(mode_name: str, cls: type | None) -> None:
        modpath = f"tests.unit._fake_mode_{mode_name}"
        monkeypatch.setitem(modes.MODES, mode_name, modpath)
        if cls is not None:
            m = types.ModuleType(modpath)
            m.MODE = cls  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, modpath, m)

    return install


def test_missing_module_is_a_one_line_error(fake_modes: Any) -> None:
    fake_modes("userspace", None)
    with pytest.raises(UserError, match="this build has no userspace mode yet"):
        load_mode_class("userspace")


def test_kernel_without_ipvs_says_how_to_run_it(fake_modes: Any) -> None:
    fake_modes("ipvs", NoKernel)
    with pytest.raises(UserError) as ei:
        build_mode("ipvs", ProxyConfig("n1"), ProxyOptions(mode="ipvs"))
    msg = str(ei.value)
    assert "ip_vs module is not available" in msg and "make test-vm" in msg and "\n" not in msg


def test_only_accepted_options_are_passed(fake_modes: Any) -> None:
    fake_modes("iptables", TakesBackend)
    m = build_mode("iptables", ProxyConfig("n1"), ProxyOptions(iptables_backend="legacy", ipvs_scheduler="sh"))
    assert isinstance(m, TakesBackend) and m.backend == "legacy"


def test_unknown_mode(fake_modes: Any) -> None:
    with pytest.raises(UserError, match="unknown mode"):
        load_mode_class("kernelspace")
