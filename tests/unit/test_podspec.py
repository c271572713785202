"""Pure pod logic of the node agent: argv, env, restart decisions, back-off, phase, status, probes."""

from __future__ import annotations

import os

import pytest

from netns.podspec import (
    Backoff,
    Conditions,
    ContainerStatus,
    ImageError,
    container_argv,
    container_env,
    container_port,
    pod_phase,
    pod_status,
    should_restart,
)
from netns.probes import parse_probe

pytestmark = pytest.mark.unit

POD = {"metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1"},
       "spec": {"nodeName": "node2", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8081}]}]}}


def test_command_wins_over_image_and_args_are_appended() -> None:
    assert container_argv({"image": "anything", "command": ["sleep"], "args": [5]}) == ["sleep", "5"]


def test_builtin_images_are_an_executable_with_the_container_args() -> None:
    from netns.images import image_argv

    argv = container_argv({"image": "docker.io/kpx/echo:1.0", "args": ["--port", "9000"]})
    assert argv == image_argv("kpx/echo", ["--port", "9000"]) and argv[-2:] == ["--port", "9000"]
    assert os.access(argv[0], os.X_OK)
    assert container_argv({"image": "kpx/http"}) == image_argv("kpx/http", [])


def test_unknown_image_names_itself_and_the_alternatives() -> None:
    with pytest.raises(ImageError) as e:
        container_argv({"image": "nginx:1.27"})
    assert 'Failed to pull image "nginx:1.27"' in str(e.value) and "kpx/echo" in str(e.value)


def test_env_values_and_downward_api() -> None:
    c = {"env": [{"name": "A", "value": "1"}, {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                 {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                 {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                 {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]}
    assert container_env(c, POD, "10.244.2.5", "192.168.56.12") == {
        "A": "1", "IP": "10.244.2.5", "NS": "shop", "NODE": "node2", "HOST": "192.168.56.12"}


@pytest.mark.parametrize(("policy", "code", "want"), [
    ("Always", 0, True), ("Always", 1, True), ("OnFailure", 0, False), ("OnFailure", 2, True),
    ("Never", 1, False), ("Never", 0, False)])
def test_restart_policy(policy: str, code: int, want: bool) -> None:
    assert should_restart(policy, code) is want


def test_backoff_first_restart_at_once_then_doubles_to_cap_and_resets() -> None:
    b = Backoff(initial=10, cap=40, reset_after=600)
    assert [b.next_delay(1) for _ in range(5)] == [0, 10, 20, 40, 40]
    assert b.next_delay(601) == 0  # ran long enough: back to an immediate restart


def cs(state: str, code: int = 0, restarted: bool = False) -> ContainerStatus:
    c = ContainerStatus(name="c", image="kpx/echo", state=state, exit_code=code)
    if restarted:
        c.last_terminated = {"exitCode": 1}
    return c


@pytest.mark.parametrize(("policy", "states", "want"), [
    ("Always", [], "Pending"),
    ("Always", [cs("waiting")], "Pending"),
    ("Always", [cs("running"), cs("waiting")], "Pending"),
    ("Always", [cs("running")], "Running"),
    ("Always", [cs("waiting", restarted=True)], "Running"),  # CrashLoopBackOff is still Running
    ("Always", [cs("terminated", 1)], "Running"),
    ("Never", [cs("terminated", 0), cs("terminated", 0)], "Succeeded"),
    ("Never", [cs("terminated", 0), cs("terminated", 3)], "Failed"),
    ("OnFailure", [cs("terminated", 3)], "Running"),
    ("OnFailure", [cs("terminated", 0)], "Succeeded"),
])
def test_pod_phase_like_kubelet(policy: str, states: list[ContainerStatus], want: str) -> None:
    assert pod_phase(policy, states) == want


def test_conditions_keep_transition_time_until_status_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    import netns.podspec as ps

    conds = Conditions()
    monkeypatch.setattr(ps, "now_rfc3339", lambda: "T1")
    first = conds.render({"Ready": (False, "ContainersNotReady", "x")})
    monkeypatch.setattr(ps, "now_rfc3339", lambda: "T2")
    same = conds.render({"Ready": (False, "ContainersNotReady", "x")})
    flipped = conds.render({"Ready": (True, "", "")})
    assert first[0]["lastTransitionTime"] == same[0]["lastTransitionTime"] == "T1"
    assert flipped[0] == {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "T2"}


def test_pod_status_ready_only_when_every_container_is() -> None:
    a, b = cs("running"), cs("running")
    b.name = "side"
    a.ready = True
    st = pod_status(pod=POD, containers=[a, b], conditions=Conditions(), sandbox_ready=True, pod_ip="10.244.2.5",
                    host_ip="192.168.56.12", start_time="T0")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert st["phase"] == "Running" and ready["status"] == "False" and ready["reason"] == "ContainersNotReady"
    assert ready["message"] == "containers with unready status: [side]"
    assert st["podIP"] == "10.244.2.5" and st["podIPs"] == [{"ip": "10.244.2.5"}]
    assert st["hostIPs"] == [{"ip": "192.168.56.12"}]
    b.ready = True
    st = pod_status(pod=POD, containers=[a, b], conditions=Conditions(), sandbox_ready=True, pod_ip="10.244.2.5",
                    host_ip="192.168.56.12", start_time="T0")
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["status"] == "True"
    assert [c["ready"] for c in st["containerStatuses"]] == [True, True]


def test_pod_status_without_sandbox_is_pending_without_ip() -> None:
    st = pod_status(pod=POD, containers=[cs("waiting")], conditions=Conditions(), sandbox_ready=False, pod_ip=None,
                    host_ip="192.168.56.12", start_time="T0")
    assert st["phase"] == "Pending" and "podIP" not in st
    assert next(c for c in st["conditions"] if c["type"] == "PodReadyToStartContainers")["status"] == "False"


def test_failed_pod_says_which_container_failed() -> None:
    pod = {**POD, "spec": {**POD["spec"], "restartPolicy": "Never"}}
    st = pod_status(pod=pod, containers=[cs("terminated", 3)], conditions=Conditions(), sandbox_ready=True,
                    pod_ip="10.244.2.5", host_ip="h", start_time="T0")
    assert st["phase"] == "Failed" and st["message"] == "container c exited with code 3"
    term = st["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3


def test_container_status_json_shapes() -> None:
    w = ContainerStatus(name="c", image="i", reason="CrashLoopBackOff", message="back-off 10s")
    w.last_terminated = {"exitCode": 137, "reason": "Error"}
    j = w.to_json()
    assert j["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}
    assert j["lastState"] == {"terminated": {"exitCode": 137, "reason": "Error"}} and j["started"] is False


def test_probe_ports_by_number_or_name() -> None:
    c = POD["spec"]["containers"][0]
    assert container_port(POD, c, 8080) == 8080 and container_port(POD, c, "9090") == 9090
    assert container_port(POD, c, "http") == 8081
    with pytest.raises(ValueError):
        container_port(POD, c, "nope")


def test_parse_probe_defaults_and_kinds() -> None:
    c = POD["spec"]["containers"][0]
    p = parse_probe(POD, c, {"httpGet": {"port": "http"}})
    assert (p.kind, p.port, p.path, p.period, p.timeout, p.failure_threshold) == ("httpGet", 8081, "/", 10, 1, 3)
    t = parse_probe(POD, c, {"tcpSocket": {"port": 80}, "periodSeconds": 2, "successThreshold": 2})
    assert (t.kind, t.port, t.period, t.success_threshold) == ("tcpSocket", 80, 2, 2)
    e = parse_probe(POD, c, {"exec": {"command": ["cat", "/tmp/ok"]}})
    assert e.command == ("cat", "/tmp/ok")
    for bad in ({"exec": {"command": []}}, {"grpc": {"port": 1}}):
        with pytest.raises(ValueError):
            parse_probe(POD, c, bad)
