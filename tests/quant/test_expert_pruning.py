"""prune_experts / count_kept_experts: the eager pruned model (the accuracy benchmark's) drops what the
rule says, leaves the original untouched, keeps its state dict, and refuses bad input."""

import pytest
import torch

from graphopt.models.deepseek import TopkRouter
from graphopt.models.random import random_model
from graphopt.quant.expert_pruning import PrunedRouter, count_kept_experts, prune_experts

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return random_model()


def test_threshold_zero_is_the_model_and_one_keeps_the_top_expert(model):
    with torch.no_grad():
        base = model(IDS)
        assert torch.equal(prune_experts(model, 0.0)(IDS), base)
        top1 = prune_experts(model, 1.0)
        assert not torch.allclose(top1(IDS), base)
    assert count_kept_experts(model, IDS)["kept"] == model.config.num_experts_per_tok
    assert count_kept_experts(top1, IDS) == {"kept": 1.0, "top_k": model.config.num_experts_per_tok,
                                             "layers": sum(model.config.is_moe_layer(i)
                                                           for i in range(model.config.num_hidden_layers))}


def test_kept_experts_fall_with_the_threshold_and_the_original_is_untouched(model):
    kept = [count_kept_experts(prune_experts(model, t), IDS)["kept"] for t in (0.0, 0.4, 0.45, 0.5)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    pruned = prune_experts(model, 0.4)
    assert not any(isinstance(m, PrunedRouter) for m in model.modules())
    routers = [m for m in pruned.modules() if isinstance(m, TopkRouter)]
    assert routers and all(isinstance(m, PrunedRouter) and m.threshold == 0.4 for m in routers)
    assert pruned.state_dict().keys() == model.state_dict().keys()   # same names: checkpoints still load


@pytest.mark.parametrize("bad", [-0.1, 1.1, True, "0.2"])
def test_bad_threshold_is_a_clear_error(model, bad):
    with pytest.raises(ValueError, match="threshold must be a number in \\[0, 1\\]"):
        prune_experts(model, bad)


def test_a_model_without_experts_is_refused():
    dense = random_model(first_k_dense_replace=2, num_hidden_layers=2, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="no routed experts"):
        prune_experts(dense, 0.2)
