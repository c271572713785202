"""The VM's kernel really load-balances with IPVS: the ground the IPVS mode stands on."""

import subprocess
import uuid

import pytest

pytestmark = pytest.mark.vm

ECHO = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080)); s.listen(64)\n"
    "while True:\n"
    "    c,_=c_a=s.accept(); c.sendall(sys.argv[1].encode()+b'\\n'); c.close()\n"
)


def sh(cmd: str) -> str:
    return subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True).stdout


def test_ipvs_round_robin_with_masquerade(tmp_path):
    tag = uuid.uuid4().hex[:6]
    node, b1, b2 = f"kpx-vm{tag}-node", f"kpx-vm{tag}-b1", f"kpx-vm{tag}-b2"
    procs = []
    try:
        for ns in (node, b1, b2):
            sh(f"ip netns add {ns}; ip -n {ns} link set lo up")
        for i, ns in ((1, b1), (2, b2)):
            sh(
                f"ip -n {node} link add v{i} type veth peer name eth0 netns {ns};"
                f"ip -n {node} addr add 10.0.{i}.1/24 dev v{i}; ip -n {node} link set v{i} up;"
                f"ip -n {ns} addr add 10.0.{i}.2/24 dev eth0; ip -n {ns} link set eth0 up;"
                f"ip -n {ns} route add default via 10.0.{i}.1"
            )
            script = tmp_path / "echo.py"
            script.write_text(ECHO)
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "python3", str(script), f"b{i}"]))
        sh(
            f"ip netns exec {node} sysctl -qw net.ipv4.vs.conntrack=1;"
            f"ip -n {node} link add kube-ipvs0 type dummy; ip -n {node} addr add 10.96.0.10/32 dev kube-ipvs0;"
            f"ip netns exec {node} ipvsadm -A -t 10.96.0.10:80 -s rr;"
            f"ip netns exec {node} ipvsadm -a -t 10.96.0.10:80 -r 10.0.1.2:8080 -m;"
            f"ip netns exec {node} ipvsadm -a -t 10.96.0.10:80 -r 10.0.2.2:8080 -m"
        )
        seen = []
        client = (
            "import socket,time,sys\n"
            "for _ in range(100):\n"
            "    try:\n"
            "        s=socket.create_connection(('10.96.0.10',80),timeout=2); print(s.recv(64).decode().strip()); break\n"
            "    except OSError: time.sleep(0.1)\n"
        )
        for _ in range(4):
            seen.append(sh(f"ip netns exec {node} python3 -c \"{client}\"").strip())
        assert sorted(set(seen)) == ["b1", "b2"], seen
        listing = sh(f"ip netns exec {node} ipvsadm -Ln")
        assert "10.96.0.10:80 rr" in listing and "10.0.1.2:8080" in listing and "Masq" in listing
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (node, b1, b2):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
