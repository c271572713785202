"""How the apiserver's settings reach the controllers, and bad settings as one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from controlplane.controllers import ALL_CONTROLLERS, ControllerConfig, ControllerSet
from kpx.errors import UserError

pytestmark = pytest.mark.unit


def test_from_mapping_object_and_defaults() -> None:
    assert ControllerConfig.from_any(None) == ControllerConfig()
    c = ControllerConfig.from_any({"cluster_cidrs": "10.244.0.0/16, fd00:10:244::/56", "controllers": ("scheduler",)})
    assert c.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/56") and c.controllers == ("scheduler",)

    @dataclass
    class ServerConfig:  # the apiserver's own config object, with its own field names
        cluster_cidr: str = "10.200.0.0/16"
        controllers: tuple[str, ...] | None = None
        secure_port: int = 6443

    c = ControllerConfig.from_any(ServerConfig())
    assert c.cluster_cidrs == ("10.200.0.0/16",) and c.controllers == ALL_CONTROLLERS
    assert ControllerConfig.from_any({"controllers": ()}).controllers == ()


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown bogus"):
        ControllerSet(None, ControllerConfig(controllers=("bogus",)))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="--cluster-cidr"):
        ControllerSet(None, ControllerConfig(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16")))  # type: ignore[arg-type]
