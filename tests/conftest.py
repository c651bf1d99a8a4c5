import numpy as np
import pytest

from personajudge.backends.toy import ToyBackend
from personajudge.core.config import BackendConfig


@pytest.fixture
def toy():
    return ToyBackend(BackendConfig(name="toy"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
