"""remove_noop_views: same-shape views, same-type casts and unobserved clones removed; views that change
a shape, real casts, layout-changing clones, snapshots of mutated inputs and returned copies kept."""

import torch

from graphopt.passes.base import count_ops
from graphopt.passes.patterns import same_shape
from graphopt.passes.remove_noop_views import RemoveNoopViewsPass


class Noops(torch.nn.Module):
    def forward(self, x):
        b = x.shape[0]
        y = torch.ops.aten._to_copy(x.view(b, 3, 8), dtype=torch.float32).clone()   # all to the same type
        y = y.expand(b, 3, 8) + 1                     # expand to the same shape
        z = torch.ops.aten.alias(y) * 2
        return y.reshape(b, 24)[:, :12] * 1.0, z.transpose(1, 2).contiguous() * 3


def test_removes_noops_and_keeps_real_views(small, run):
    captured = small(Noops(), (torch.randn(4, 3, 8),))
    before = count_ops(captured.step.graph_module)
    ran = run(captured, [RemoveNoopViewsPass()])     # verify: exact
    after = count_ops(ran.graph_module)
    assert before["aten.view.default"] == 2 and after["aten.view.default"] == 1       # [B,3,8] kept [B,24]
    assert before["aten._to_copy.default"] == 1 and "aten._to_copy.default" not in after
    assert before["aten.expand.default"] == 1 and "aten.expand.default" not in after
    assert before["aten.alias.default"] == 1 and "aten.alias.default" not in after
    # the first clone copies to the same layout: gone; the transposed .contiguous() changes strides: kept
    assert before["aten.clone.default"] == 2 and after["aten.clone.default"] == 1
    # [:, :12] is two slices: the full one over dim 0 goes, the real one over dim 1 stays
    assert before["aten.slice.Tensor"] == 2 and after["aten.slice.Tensor"] == 1
    assert ran.record("remove_noop_views").matches == 6
    assert ran.record("remove_noop_views").max_error == 0.0


class Snapshot(torch.nn.Module):
    def forward(self, x, cache):
        snap = cache.clone()                  # taken before the in-place update: must stay a copy
        cache.add_(x)
        return snap * 2, x.clone()            # a returned clone must not become an alias of an input


def test_keeps_snapshots_of_mutated_inputs_and_returned_copies(small, run):
    captured = small(Snapshot(), (torch.randn(4, 8), torch.randn(4, 8)))
    assert count_ops(captured.step.graph_module)["aten.clone.default"] == 2
    ran = run(captured, [RemoveNoopViewsPass()])
    assert ran.record("remove_noop_views").matches == 0
    assert count_ops(ran.graph_module) == count_ops(captured.step.graph_module)


def test_symbolic_sizes_compare_by_expression_without_guards(small):
    class Two(torch.nn.Module):
        def forward(self, x, y):
            return x + 1, y + 1

    gm = small(Two(), (torch.randn(4, 8), torch.randn(4, 8))).step.graph_module
    x, y = (n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder")
    assert same_shape(x.shape, x.shape) and same_shape(x.shape, (x.shape[0], 8))
    assert not same_shape(x.shape, (x.shape[0], 9)) and not same_shape(x.shape, (4, 8))


def test_on_the_captured_step(main_fp32, run):
    ran = run(main_fp32, [RemoveNoopViewsPass()])
    # the reference model's capture holds no no-op views (casts to the same dtype vanish at capture)
    assert ran.record("remove_noop_views").matches == 0
    assert count_ops(ran.graph_module) == count_ops(main_fp32.step.graph_module)
