import pytest

from controlplane.errors import ApiError
from controlplane.selectors import parse, parse_field_selector, parse_label_selector

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("sel,labels,want", [
    ("", {}, True),
    ("app=x", {"app": "x"}, True),
    ("app==x", {"app": "y"}, False),
    ("app!=x", {}, True),
    ("app!=x", {"app": "x"}, False),
    ("app in (a, b)", {"app": "b"}, True),
    ("app notin (a,b)", {"app": "c"}, True),
    ("app notin (a,b)", {}, True),
    ("app", {"app": ""}, True),
    ("!app", {"app": ""}, False),
    ("app=x,tier", {"app": "x"}, False),
    ("n>3", {"n": "4"}, True),
    ("n<3", {"n": "4"}, False),
    ("example.com/role=web", {"example.com/role": "web"}, True),
    ("app=", {"app": ""}, True),
])
def test_label_selector_matching(sel, labels, want):
    assert parse_label_selector(sel).matches(labels) is want


@pytest.mark.parametrize("sel", ["a in x", "a in (b", "=x", "a,", "a b", "a<x", "Bad Key=x", "a=b=c",
                                 "a=" + "v" * 64, "!!a", "a in (", "-a=b"])
def test_bad_label_selectors_are_400(sel):
    with pytest.raises(ApiError) as e:
        parse_label_selector(sel)
    assert e.value.code == 400 and e.value.reason == "BadRequest"


def test_field_selectors_per_kind():
    pod = {"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
    f = parse_field_selector("spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed", "pods")
    assert f.matches(pod)
    assert not parse_field_selector("spec.nodeName=", "pods").matches(pod)
    assert parse_field_selector("spec.hostNetwork=false", "pods").matches(pod)
    assert parse_field_selector("metadata.name==p", "pods").matches(pod)
    assert parse_field_selector(r"metadata.name=a\,b", "pods").reqs[0].value == "a,b"
    ev = {"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "uid": "u"}, "source": {"component": "c"}}
    assert parse_field_selector("involvedObject.kind=Pod,involvedObject.uid=u,source=c", "events").matches(ev)
    assert parse_field_selector("regarding.kind=Pod", "events").matches(ev)  # events.k8s.io spelling


@pytest.mark.parametrize("sel,resource", [("spec.nodeName=x", "services"), ("foo=bar", "pods"), ("a", "pods"),
                                          ("metadata.name=a=b", "pods"), (",", "pods")])
def test_bad_field_selectors_are_400(sel, resource):
    with pytest.raises(ApiError) as e:
        parse_field_selector(sel, resource)
    assert e.value.code == 400


def test_combined_selector():
    s = parse("app=x", "metadata.name=n", "services")
    assert s.matches({"metadata": {"name": "n", "labels": {"app": "x"}}})
    assert not s.matches({"metadata": {"name": "m", "labels": {"app": "x"}}})
    assert not s.matches(None)
    assert parse("", "", "services").empty
