import pytest
import torch

from graphopt.models.random import random_model


@pytest.fixture
def model():
    return random_model()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run through the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
