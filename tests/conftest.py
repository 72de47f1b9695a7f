import functools
import os
from pathlib import Path

import pytest
import torch

from graphopt.models.random import random_model

# The suite runs thousands of tiny ops: one thread avoids OpenMP hand-off costs that dominate them
# on a 2-core machine (a quant subset ran 15 s with one thread, 117 s with two under load).
torch.set_num_threads(1)


@pytest.fixture
def model():
    return random_model()


def pytest_collection_modifyitems(config, items):
    # `slow` tests (minutes each on 2 cores) run only with GRAPHOPT_SLOW_TESTS=1, so CI stays well under 15 min
    run_slow = os.environ.get("GRAPHOPT_SLOW_TESTS", "") not in ("", "0")
    skip_slow = pytest.mark.skip(reason="slow: set GRAPHOPT_SLOW_TESTS=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_xdist_make_scheduler(config, log):
    """Under -n (xdist's default `load` distribution), a test module that defines a module-scoped fixture
    (most are a compile: 10-70 s) runs on one worker, so the fixture is built once, not once per worker
    (the onnx module's ran twice: 2 x 65 s). Every other test is scheduled one by one, as before."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if _defines_module_fixture(config.rootpath / path) else nodeid

    return ModuleFixtureScheduling(config, log)


@functools.cache
def _defines_module_fixture(path: Path) -> bool:
    return path.suffix == ".py" and path.is_file() and 'scope="module"' in path.read_text()


@pytest.fixture(scope="session")
def compiled_random(tmp_path_factory):
    """One compile of the random model (capture costs seconds), with dumps and verify mode on.

    Returns (model, compiled, dump_dir, state_dict snapshot taken before compiling).
    """
    import graphopt

    m = random_model()
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    dump_dir = tmp_path_factory.mktemp("dump")
    compiled = graphopt.compile(m, block_size=4, dump_dir=str(dump_dir), verify=True)
    return m, compiled, dump_dir, snapshot

