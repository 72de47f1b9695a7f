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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
