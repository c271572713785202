"""Talking to iptables: backend detection (legacy vs nft), the restore runner, save parsing.

Each call is one process (`iptables-<backend>-restore`, `-save`), optionally inside a named netns
via `ip netns exec` (tests and the bench drive a node netns from outside; `kpx proxy` itself runs
inside the node's netns and passes netns=None).

python-iptables (`iptc`) binds libiptc, i.e. legacy xtables only, and works in the netns of the
calling process: `Iptables.chain_exists` uses it for the legacy backend when no netns is given
(the proxy's canary poll), and falls back to the CLI otherwise (nft backend, or a foreign netns).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BACKENDS = ("legacy", "nft")
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
# iptables-nft <= 1.8.9 keeps the chains a --noflush restore names in a list searched with strcmp
# per command: quadratic (measured: 1k Services x 10 endpoints, 11k chains, 27-97 s). A chain-less
# `-S` makes it request all chains of the table instead (linear; it prints the table, discarded).
# It costs one dump of the table's rules, so it is used only when the payload declares many chains.
NFT_ALL_CHAINS_ABOVE = 2000


class IptablesError(Exception):
    """An iptables command failed; the message carries its stderr (one line where possible)."""


def _run(argv: Sequence[str], *, netns: str | None, stdin: bytes | None = None, timeout: float = 60) -> bytes:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise IptablesError(f"{argv[0]} not found: install the iptables package") from e
    except subprocess.TimeoutExpired as e:
        raise IptablesError(f"{' '.join(argv)} timed out after {timeout}s") from e
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise IptablesError(f"{' '.join(argv)} failed (exit {p.returncode}): {err}")
    return p.stdout


def detect_backend(netns: str | None = None) -> str:
    """Pick the backend the node already uses, as kubernetes-sigs/iptables-wrapper does: a
    kubelet hint chain in mangle wins; else the backend holding more rules; else nft."""
    for backend in ("nft", "legacy"):
        try:
            out = _run([f"iptables-{backend}-save", "-t", "mangle"], netns=netns)
        except IptablesError:
            continue
        if any(f":{h} " in out.decode() for h in HINT_CHAINS):
            return backend
    counts: dict[str, int] = {}
    for backend in BACKENDS:
        try:
            dump = _run([f"iptables-{backend}-save"], netns=netns).decode()
        except IptablesError:
            counts[backend] = -1
            continue
        counts[backend] = sum(1 for line in dump.splitlines() if line.startswith("-"))
    return "legacy" if counts["legacy"] > counts["nft"] else "nft"


def iptables_version(backend: str, netns: str | None = None) -> tuple[int, int, int]:
    out = _run([f"iptables-{backend}", "--version"], netns=netns).decode()
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise IptablesError(f"cannot parse iptables version from {out!r}")
    return (int(m[1]), int(m[2]), int(m[3]))


@dataclass(frozen=True, slots=True)
class SavedTables:
    """Chains and rules of an `iptables-save` dump (what apply needs on a full sync)."""

    chains: dict[str, list[str]]  # table -> chain names (declaration order)
    rules: dict[str, list[str]]  # table -> `-A ...` lines

    def has_jump(self, table: str, source: str, target: str) -> bool:
        prefix = f"-A {source} "
        suffix = f"-j {target}"
        return any(r.startswith(prefix) and (r.endswith(suffix) or f"{suffix} " in r) for r in self.rules.get(table, ()))


def parse_save(text: str) -> SavedTables:
    chains: dict[str, list[str]] = {}
    rules: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        c = line[0]
        if c == "*":
            table = line[1:]
            chains.setdefault(table, [])
            rules.setdefault(table, [])
        elif c == ":":
            chains[table].append(line[1:].split(" ", 1)[0])
        elif c == "-":
            rules[table].append(line)
    return SavedTables(chains, rules)


def nft_needs_hint(payload: str, above: int = NFT_ALL_CHAINS_ABOVE) -> bool:
    return payload.count("\n:") > above


def nft_all_chains_hint(payload: str, above: int = NFT_ALL_CHAINS_ABOVE) -> str:
    """Add `-S` to the filter and nat sections when the payload declares more than `above`
    chains (see NFT_ALL_CHAINS_ABOVE). `-S` does not change the kernel state."""
    if not nft_needs_hint(payload, above):
        return payload
    out = "\n" + payload
    for table in ("filter", "nat"):
        out = out.replace(f"\n*{table}\n", f"\n*{table}\n-S\n", 1)
    return out[1:]


class Iptables:
    """One backend's command set, optionally inside a named netns."""

    def __init__(self, backend: str, netns: str | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.backend = backend
        self.netns = netns

    def _wait(self) -> list[str]:
        # legacy xtables serialises writers with /run/xtables.lock, shared by every netns
        return ["-w", "10"] if self.backend == "legacy" else []

    def restore(self, payload: str | bytes, *, test: bool = False, noflush: bool = True) -> None:
        """One `iptables-restore --noflush --counters` transaction (all tables or none).
        noflush=False replaces the payload's tables whole: only for an empty throw-away netns
        (the bench populates one that way; iptables-nft 1.8.9 --noflush is quadratic)."""
        if self.backend == "nft" and noflush and isinstance(payload, str):
            payload = nft_all_chains_hint(payload)
        data = payload.encode() if isinstance(payload, str) else payload
        argv = [f"iptables-{self.backend}-restore", *(["--noflush"] if noflush else []), "--counters", *self._wait()]
        if test:
            argv.append("--test")
        _run(argv, netns=self.netns, stdin=data, timeout=120)

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        argv = [f"iptables-{self.backend}-save"]
        if table:
            argv += ["-t", table]
        if counters:
            argv.append("-c")
        return _run(argv, netns=self.netns).decode()

    def snapshot(self, builtin: dict[str, set[str]]) -> SavedTables:
        """What a full sync needs to know: every chain name, and the rules of the given builtin
        chains (table -> chains). legacy: one iptables-save. nft: `nft -j list chains ip` plus one
        `-S` per builtin chain, which skips translating every rule back (iptables-nft-save of 10k
        Services x 10 endpoints: ~20 s here; this: ~1-2 s)."""
        if self.backend == "legacy":
            return parse_save(self.save())
        try:
            import orjson

            doc = orjson.loads(_run(["nft", "-j", "list", "chains", "ip"], netns=self.netns))
        except (IptablesError, ValueError):
            return parse_save(self.save())
        chains: dict[str, list[str]] = {}
        for item in doc.get("nftables", ()):
            c = item.get("chain")
            if c and c.get("family") == "ip":
                chains.setdefault(str(c["table"]), []).append(str(c["name"]))
        rules: dict[str, list[str]] = {}
        for table, names in builtin.items():
            for chain in sorted(names):
                if chain in chains.get(table, ()):
                    rules.setdefault(table, []).extend(self.list_rules(table, chain))
        return SavedTables(chains, rules)

    def run(self, *args: str) -> str:
        return _run([f"iptables-{self.backend}", *self._wait(), *args], netns=self.netns).decode()

    def chain_exists(self, table: str, chain: str) -> bool:
        if self.backend == "legacy" and self.netns is None:
            try:
                import iptc  # python-iptables: libiptc, legacy only, this process's netns

                return bool(iptc.Table(table, autocommit=False).is_chain(chain))
            except Exception:  # library missing or libiptc unusable: use the CLI
                pass
        try:
            self.run("-t", table, "-S", chain)  # our canary is empty: one line of output
            return True
        except IptablesError:
            return False

    def list_rules(self, table: str, chain: str) -> list[str]:
        try:
            out = self.run("-t", table, "-S", chain)
        except IptablesError:
            return []
        return [line for line in out.splitlines() if line.startswith("-A ")]

    def delete_rules(self, table: str, rules: Iterable[str]) -> None:
        """Delete `-A CHAIN spec` rules (as `-S`/save lists them) in one restore transaction;
        restore parses the quoting of comments exactly as iptables printed it."""
        lines = [r.replace("-A ", "-D ", 1) for r in rules if r.startswith("-A ")]
        if lines:
            self.restore(f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n")
