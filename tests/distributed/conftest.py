"""The local Ray instance the Ray tests share."""

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local instance for the module: bounded (2 CPUs, no dashboard), on 127.0.0.1, shut down after."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
