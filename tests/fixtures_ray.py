"""Ray fixture (distributed embedding, retinacli.distributed): one local Ray per test session.

``ray_local`` starts Ray once (2 CPUs, no dashboard) and shuts it down at the end of the session;
`retina embed --ray` run in-process reuses it (an initialised Ray is used as it is, never shut down).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
