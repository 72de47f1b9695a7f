import os

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

