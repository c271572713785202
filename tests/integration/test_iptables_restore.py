"""The iptables mode against the real kernel, in throw-away network namespaces, both backends:
iptables-restore accepts every golden payload; apply is one atomic transaction that never
flushes what it does not own; full syncs ensure jumps and sweep stale chains; drift detection,
restart without flush, cleanup, backend detection, and python-iptables where it works."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.iptables_restore import Iptables, detect_backend, parse_save
from proxy.model import ServicePortName
from proxy.modes.base import ApplyError, Plan
from proxy.modes.iptables import IptablesMode
from proxy.modes.iptables_render import JUMP_CHAINS, RestorePayload
from tests.unit.test_iptables_render import CASES, CFG, SETUP, WEB, _two_services, ep, state, svc

pytestmark = pytest.mark.netns

BACKENDS = ("legacy", "nft")
ROOT = Path(__file__).resolve().parents[2]


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpx-h6t{secrets.token_hex(4)}"
    _sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        _sh("ip", "netns", "del", name, check=False)


def _save(ns: str, backend: str, table: str | None = None) -> str:
    return Iptables(backend, ns).save(table)


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A ")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_restore_accepts_golden_payload(netns: str, backend: str, case: str) -> None:
    ipt = Iptables(backend, netns)
    if case in SETUP:
        ipt.restore(SETUP[case]()[0].payload.text())
    text = CASES[case]().payload.text()
    ipt.restore(text, test=True)
    ipt.restore(text)  # and for real: the kernel now holds every rule of the payload's chains
    saved = parse_save(ipt.save())
    for table, (_chains, rules) in CASES[case]().payload.tables.items():
        n_payload = sum(1 for line in rules.splitlines() if line.startswith("-A "))
        assert len(saved.rules.get(table, [])) == n_payload or case in SETUP


def _mode(ns: str, backend: str) -> IptablesMode:
    return IptablesMode(CFG, backend=backend, netns=ns)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_sync_ensures_jumps_once_and_keeps_foreign_rules(netns: str, backend: str) -> None:
    ipt = Iptables(backend, netns)
    # someone else's chain and a rule in a builtin chain: never touched
    ipt.restore("*nat\n:FOREIGN - [0:0]\n-A FOREIGN -j RETURN\n-A PREROUTING -p tcp --dport 9 -j FOREIGN\nCOMMIT\n")
    m = _mode(netns, backend)
    st = state(_two_services((ep("10.244.1.3"),)))
    prior = m.apply(m.render(st, None))
    prior = m.apply(m.render(st, None))  # second full sync: no duplicate jumps
    saved = parse_save(ipt.save())
    for j in JUMP_CHAINS:
        jumps = [r for r in saved.rules[j.table] if r.startswith(f"-A {j.source} ") and r.endswith(f"-j {j.target}")]
        assert len(jumps) == 1, (j, jumps)
    assert "-A FOREIGN -j RETURN" in saved.rules["nat"]
    assert any("--dport 9 -j FOREIGN" in r for r in saved.rules["nat"])
    # our jumps are prepended, as upstream's EnsureRule(Prepend)
    pre = [r for r in saved.rules["nat"] if r.startswith("-A PREROUTING")]
    assert pre[0].endswith("-j KUBE-SERVICES")
    assert "KUBE-PROXY-CANARY" in saved.chains["mangle"]
    assert "KUBE-SVC-4SW47YFZTEDKD3PK" in saved.chains["nat"]
    # partial sync: only web's chains rewritten, svc4's chain untouched
    before = [r for r in saved.rules["nat"] if r.startswith("-A KUBE-SVC-4SW47YFZTEDKD3PK")]
    plan = m.render(state(_two_services((ep("10.244.1.3"), ep("10.244.2.3", "node2"))), changed=frozenset({WEB})), prior)
    assert not plan.full and "KUBE-SVC-4SW47YFZTEDKD3PK -" not in plan.payload.text()
    m.apply(plan)
    after = parse_save(ipt.save())
    assert [r for r in after.rules["nat"] if r.startswith("-A KUBE-SVC-4SW47YFZTEDKD3PK")] == before
    assert any("--to-destination 10.244.2.3:8080" in r for r in after.rules["nat"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_sweeps_stale_chains_without_flushing(netns: str, backend: str) -> None:
    ipt = Iptables(backend, netns)
    m = _mode(netns, backend)
    m.apply(m.render(state(_two_services((ep("10.244.1.3"),))), None))
    # a new process (no prior) whose state lost svc4: the kernel sweep deletes its chains
    m2 = _mode(netns, backend)
    plan = m2.render(state([(svc(WEB, "10.96.0.50", node_port=30080), (ep("10.244.1.3"),))]), None)
    assert "-X" not in plan.payload.text()  # render cannot know; apply asks the kernel
    m2.apply(plan)
    saved = parse_save(ipt.save())
    assert not [c for c in saved.chains["nat"] if c == "KUBE-SVC-4SW47YFZTEDKD3PK" or c.startswith("KUBE-SEP-E2ON")]
    assert plan.stats["chains_deleted"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_restore_changes_nothing(netns: str, backend: str) -> None:
    ipt = Iptables(backend, netns)
    m = _mode(netns, backend)
    prior = m.apply(m.render(state(_two_services((ep("10.244.1.3"),))), None))
    before = _rules(_save(netns, backend))
    good = m.render(state(_two_services((ep("10.244.1.9"),)), changed=frozenset({WEB})), prior)
    nat_chains, nat_rules = good.payload.tables["nat"]
    broken = RestorePayload(dict(good.payload.tables))
    broken.tables["nat"] = (nat_chains, nat_rules + "-A KUBE-SERVICES -j KUBE-NO-SUCH-CHAIN\n")
    with pytest.raises(ApplyError):
        m.apply(Plan(full=False, payload=broken, prior=good.prior))
    assert _rules(_save(netns, backend)) == before
    assert ipt.chain_exists("nat", "KUBE-SERVICES")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flush", ["nat -F", "nat -F+X", "mangle canary"])
def test_drift_detected_and_repaired(netns: str, backend: str, flush: str) -> None:
    ipt = Iptables(backend, netns)
    m = _mode(netns, backend)
    st = state(_two_services((ep("10.244.1.3"),)))
    m.apply(m.render(st, None))
    assert not m.check_drift()
    if flush == "mangle canary":
        ipt.run("-t", "mangle", "-X", "KUBE-PROXY-CANARY")
    else:
        ipt.run("-t", "nat", "-F")
        if flush.endswith("X"):
            ipt.run("-t", "nat", "-X")
    assert m.check_drift()
    m.apply(m.render(st, None))  # the core's forced full sync
    assert not m.check_drift()
    saved = parse_save(ipt.save())
    assert any(r.startswith("-A PREROUTING") and r.endswith("-j KUBE-SERVICES") for r in saved.rules["nat"])
    assert any(r.startswith("-A KUBE-SVC-4SW47YFZTEDKD3PK") for r in saved.rules["nat"])


def test_cleanup_removes_everything_in_both_backends(netns: str) -> None:
    for backend in BACKENDS:
        m = _mode(netns, backend)
        m.apply(m.render(state(_two_services((ep("10.244.1.3"),))), None))
        Iptables(backend, netns).restore("*filter\n:FOREIGN - [0:0]\n-A INPUT -j FOREIGN\nCOMMIT\n")
    _mode(netns, "nft").cleanup()  # one call cleans both backends
    for backend in BACKENDS:
        text = _save(netns, backend)
        assert "KUBE-" not in text, text
        assert "-A INPUT -j FOREIGN" in text
    _mode(netns, "nft").cleanup()  # idempotent


def test_detect_backend(netns: str) -> None:
    assert detect_backend(netns) == "nft"  # nothing anywhere: nft
    Iptables("legacy", netns).restore("*filter\n:X - [0:0]\n-A X -j RETURN\n-A INPUT -j X\nCOMMIT\n")
    assert detect_backend(netns) == "legacy"  # more rules in legacy
    Iptables("nft", netns).restore("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")
    assert detect_backend(netns) == "nft"  # kubelet's hint wins
    assert IptablesMode(CFG, backend="auto", netns=netns).backend == "nft"


def test_python_iptables_reads_legacy_in_this_netns(netns: str) -> None:
    """python-iptables binds libiptc: it sees legacy tables of its own process's netns only."""
    Iptables("legacy", netns).restore("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n")
    Iptables("nft", netns).restore("*nat\n:KUBE-NODEPORTS - [0:0]\nCOMMIT\n")
    code = (
        "import iptc; t = iptc.Table('nat');"
        "print(t.is_chain('KUBE-SERVICES'), t.is_chain('KUBE-NODEPORTS'));"
        "from proxy.iptables_restore import Iptables;"
        "print(Iptables('legacy').chain_exists('nat', 'KUBE-SERVICES'), Iptables('nft').chain_exists('nat', 'KUBE-NODEPORTS'))"
    )
    out = _sh("ip", "netns", "exec", netns, sys.executable, "-c", code).stdout.split("\n")
    assert out[0] == "True False"  # legacy chain visible, the nft one is not (libiptc = legacy only)
    assert out[1] == "True True"


def test_mode_rejects_unknown_backend() -> None:
    from proxy.modes.base import ModeUnavailable

    with pytest.raises(ModeUnavailable, match="legacy or nft"):
        IptablesMode(CFG, backend="xtables")


def test_nft_many_chains_hint_keeps_the_result(netns: str) -> None:
    """The `-S` work-around for iptables-nft's quadratic --noflush is invisible in the result."""
    from proxy.iptables_restore import NFT_ALL_CHAINS_ABOVE, nft_all_chains_hint
    from proxy.modes.iptables_render import IptablesRenderer

    n = NFT_ALL_CHAINS_ABOVE // 3 + 50  # 3 chains per port (SVC + 2 SEP) -> above the threshold
    ports = [(svc(spn_i, f"10.96.{i // 250}.{i % 250 + 1}"), (ep(f"10.244.{i // 125}.{2 * (i % 125) + 2}"),
              ep(f"10.244.{i // 125}.{2 * (i % 125) + 3}", "node2")))
             for i, spn_i in enumerate(ServicePortName("ns", f"s{k}", "p") for k in range(n))]
    text = IptablesRenderer(CFG).render(state(ports), None).payload.text()
    assert nft_all_chains_hint(text) != text and "\n*nat\n-S\n" in nft_all_chains_hint(text)
    results = {}
    for backend in BACKENDS:
        Iptables(backend, netns).restore(text)  # nft: with the hint
        results[backend] = sorted(_rules(_save(netns, backend)))
    assert results["nft"] == results["legacy"] and len(results["nft"]) > 3 * n


def test_nft_full_sync_with_many_chains_hooks_jumps(netns: str) -> None:
    """Above the hint threshold the nft backend hooks the jumps in a second transaction."""
    from proxy.iptables_restore import NFT_ALL_CHAINS_ABOVE

    n = NFT_ALL_CHAINS_ABOVE // 2 + 10  # SVC + SEP per port
    ports = [(svc(ServicePortName("ns", f"s{k}", "p"), f"10.96.{k // 250}.{k % 250 + 1}"),
              (ep(f"10.244.{k // 250}.{k % 250 + 1}"),)) for k in range(n)]
    m = _mode(netns, "nft")
    m.apply(m.render(state(ports), None))
    saved = parse_save(_save(netns, "nft"))
    for j in JUMP_CHAINS:
        assert sum(1 for r in saved.rules[j.table] if r.startswith(f"-A {j.source} ") and r.endswith(f"-j {j.target}")) == 1
    assert len([c for c in saved.chains["nat"] if c.startswith("KUBE-SEP-")]) == n
    assert not m.check_drift()


def test_nft_snapshot_matches_save(netns: str) -> None:
    """The nft fast path (nft -j list chains + -S of builtin chains) sees what iptables-save sees."""
    ipt = Iptables("nft", netns)
    ipt.restore("*nat\n:FOREIGN - [0:0]\n-A PREROUTING -p udp --dport 9 -j FOREIGN\nCOMMIT\n")
    m = _mode(netns, "nft")
    m.apply(m.render(state(_two_services((ep("10.244.1.3"),))), None))
    builtin = {"nat": {"PREROUTING", "OUTPUT", "POSTROUTING"}, "filter": {"INPUT", "FORWARD", "OUTPUT"}}
    fast, full = ipt.snapshot(builtin), parse_save(ipt.save())
    builtins = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}  # save prints them even if absent
    for table in ("nat", "filter", "mangle"):
        assert sorted(set(fast.chains[table]) - builtins) == sorted(set(full.chains[table]) - builtins)
    assert "KUBE-SVC-4SW47YFZTEDKD3PK" in fast.chains["nat"]
    for table, chains in builtin.items():
        want = sorted(r for r in full.rules[table] if r.split()[1] in chains)
        assert sorted(fast.rules[table]) == want and want
