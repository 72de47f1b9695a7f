"""Rewrite expanded MLA attention (latent -> kv_b_proj -> attention) into `graphopt.mla_attention`.

The op attends directly over the latent cache in the absorbed form for short queries (decode, the
1+k tokens of a speculative step: W_UK folded into the query, W_UV applied after the attention) and
keeps the expanded form for prefill; it picks by T at run time (ops/attention.py, T <= 8).

What is matched, walking up from each softmax (casts, clones and aliases in between are skipped):
    probs   = softmax(mask(scale * scores))       mask: masked_fill(~visible, -inf) | + additive | none
    scores  = q_nope . k_nope + q_pe . k_pe        as two einsums (graphopt's reference model), or one
                                                   matmul of cat(q_nope, q_pe) with the concatenated key
                                                   (transformers' DeepseekV3Attention: `torch.cat`, or
                                                   new_empty + copy into slices, as 5.x writes it)
    k_nope, v = split(view(kv_b_proj(latent)), [dn, dv])   per head; [B, S, H, .] or transposed
    out     = probs @ v                            einsum or matmul; [B, T, H, dv] or [B, H, T, dv]
Checked explicitly (the structure cannot tell): the kv_b weight is a [H * (dn + dv), R] get_attr,
the split sizes are [dn, dv] of that weight, k_nope and v come from the same split, latent and k_pe
are [B, S, .] (or [B, 1, S, .]), q_pe and k_pe share the rope size, the softmax is over keys.
Not matched: attention whose keys and values have their own projections (Llama, nn.MultiheadAttention),
keys not expanded from a latent by one linear, SDPA / flash kernels (no softmax node to anchor on).

Why a walk and not a traced pattern (STYLE rule 3): MLA reaches us in two layouts whose ATen differs
across transformers versions, with batch / key sizes that are symbolic in one capture and plain ints
in another; each step of the walk below is one small function that names the piece it recognises.

Before (float32, from `capture_main(random_model())`, layer 0; size and assert nodes left out):
    linear_3: "f32[s5, 16*s46, 128]" = torch.ops.aten.linear.default(getitem_4, model_model_layers_0_self_attn_kv_b_proj_weight)
    view_7: "f32[s5, 16*s46, 4, 32]" = torch.ops.aten.view.default(linear_3, [sym_size_int_70, mul_216, 4, 32])
    split_with_sizes_3 = torch.ops.aten.split_with_sizes.default(view_7, [16, 16], -1)
    getitem_6: "f32[s5, 16*s46, 4, 16]" = split_with_sizes_3[0]
    getitem_7: "f32[s5, 16*s46, 4, 16]" = split_with_sizes_3[1]
    einsum: "f32[s5, 4, s18, 16*s46]" = torch.ops.aten.einsum.default('bthd,bshd->bhts', [getitem, getitem_6])
    einsum_1: "f32[s5, 4, s18, 16*s46]" = torch.ops.aten.einsum.default('bthd,bsd->bhts', [cat, getitem_5])
    add_336: "f32[s5, 4, s18, 16*s46]" = torch.ops.aten.add.Tensor(einsum, einsum_1)
    mul_261: "f32[s5, 4, s18, 16*s46]" = torch.ops.aten.mul.Tensor(add_336, 0.2041241452319315)
    bitwise_not: "b8[s5, 1, s18, 16*s46]" = torch.ops.aten.bitwise_not.default(le_4)
    masked_fill: "f32[s5, 4, s18, 16*s46]" = torch.ops.aten.masked_fill.Scalar(mul_261, bitwise_not, -inf)
    softmax: "f32[s5, 4, s18, 16*s46]" = torch.ops.aten.softmax.int(masked_fill, -1)
    einsum_2: "f32[s5, s18, 4, 16]" = torch.ops.aten.einsum.default('bhts,bshd->bthd', [softmax, getitem_7])
After:
    view_default: "f32[4, 32, 32]" = torch.ops.aten.view.default(model_model_layers_0_self_attn_kv_b_proj_weight, [4, 32, 32])
    slice_tensor: "f32[4, 16, 32]" = torch.ops.aten.slice.Tensor(view_default, 1, 0, 16)
    slice_tensor_1: "f32[4, 16, 32]" = torch.ops.aten.slice.Tensor(view_default, 1, 16, 32)
    mla_attention_default: "f32[s5, s18, 4, 16]" = torch.ops.graphopt.mla_attention.default(getitem, cat, getitem_4, getitem_5, model_model_layers_0_self_attn_kv_b_proj_weight, slice_tensor, slice_tensor_1, le_4, 0.2041241452319315, 8)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..ops import attention  # noqa: F401  registers torch.ops.graphopt.mla_attention
from ..ops.attention import ABSORB_MAX_TOKENS
from .base import GraphPass, PassContext, PassResult
from .patterns import call_op, fake_mode_of, is_assert

__all__ = ["RewriteMLAAbsorbedPass", "find_site"]

aten = torch.ops.aten
_SKIP = {aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default, aten.to.dtype}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_NOT = {aten.bitwise_not.default, aten.logical_not.default}


class _NoMatch(Exception):
    """This softmax is not the attention of an expanded MLA; the message says which piece failed."""


@dataclass
class _Operand:
    node: fx.Node
    dims: str   # its dimensions: b batch, h heads, t queries, s keys, d features (e.g. "bthd", "bhsd")


@dataclass
class _Site:
    q_nope: _Operand
    q_pe: _Operand
    latent: fx.Node
    k_pe: fx.Node
    weight: fx.Node
    mask: fx.Node | None
    mask_negated: bool                 # masked_fill(mask, -inf): the op wants the visible positions
    scale: float
    out: fx.Node
    out_dims: str                      # "bthd" or "bhtd"
    visited: list[fx.Node] = field(default_factory=list)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _up(node: fx.Node, seen: list) -> fx.Node:
    """Skip casts, clones and aliases going up (they do not change what attention computes)."""
    while _is(node, *_SKIP):
        seen.append(node)
        node = node.args[0]
    return node


# -- scores --------------------------------------------------------------------------------------

def _einsum_dims(eq: str, out_roles: str) -> list[str]:
    """Roles of each einsum operand's dims, from the output's roles: 'bthd,bshd->bhts' -> bthd, bshd."""
    ins, out = eq.replace(" ", "").split("->")
    role = dict(zip(out, out_roles))
    return ["".join(role.get(c, "d") for c in spec) for spec in ins.split(",")]


def _product(node: fx.Node, seen: list) -> tuple[_Operand, _Operand]:
    """q . k over the feature dim -> [B, H, T, S]: an einsum, or matmul(q, k.transpose(-2, -1))."""
    node = _up(node, seen)
    if _is(node, aten.einsum.default) and len(node.args[1]) == 2:
        dq, dk = _einsum_dims(node.args[0], "bhts")
        if sorted(dq) == sorted("bthd") and set(dk) <= set("bshd") and {"b", "s", "d"} <= set(dk):
            seen.append(node)
            return _Operand(node.args[1][0], dq), _Operand(node.args[1][1], dk)
    if _is(node, aten.matmul.default) and _is(node.args[1], aten.transpose.int) \
            and sorted(x % 4 for x in node.args[1].args[1:]) == [2, 3]:
        seen += [node, node.args[1]]
        return _Operand(node.args[0], "bhtd"), _Operand(node.args[1].args[0], "bhsd")
    raise _NoMatch(f"{node.name} is not a query-key product (einsum / matmul with a transposed key)")


def _parts(node: fx.Node, seen: list) -> tuple[fx.Node, fx.Node]:
    """The two halves of a tensor built by concatenating on the last dim: cat, or slices copied into new_empty."""
    node = _up(node, seen)
    dim = node.args[1] if len(node.args) > 1 else 0
    if _is(node, aten.cat.default) and len(node.args[0]) == 2 and dim in (-1, _val(node).dim() - 1):
        seen.append(node)
        return node.args[0][0], node.args[0][1]
    if _is(node, aten.slice_scatter.default) and _is(node.args[0], aten.slice_scatter.default):
        inner = node.args[0]
        base = inner.args[0]
        copies = (inner.args[1], node.args[1])
        if _is(base, aten.new_empty.default, aten.empty.memory_format) and all(_is(c, aten.copy.default) for c in copies):
            seen += [node, inner, base, *copies, *(c.args[0] for c in copies)]
            return copies[0].args[1], copies[1].args[1]
    raise _NoMatch(f"{node.name} is not a concatenation of a no-rope and a rope part")


def _terms(scores: fx.Node, seen: list) -> list[tuple[_Operand, _Operand]]:
    """[(q, k) of each term of the score sum]: two products, or one product of two concatenations."""
    if _is(scores, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in scores.args[:2]):
        seen.append(scores)
        return [_product(a, seen) for a in scores.args[:2]]
    q, k = _product(scores, seen)
    (q0, q1), (k0, k1) = _parts(q.node, seen), _parts(k.node, seen)
    return [(_Operand(q0, q.dims), _Operand(k0, k.dims)), (_Operand(q1, q.dims), _Operand(k1, k.dims))]


def _mask_and_scale(x: fx.Node, seen: list):
    """softmax input -> (mask, negated, scale, raw scores). Each of the three pieces is optional."""
    mask, negated = None, False
    if _is(x, aten.masked_fill.Scalar) and x.args[2] == float("-inf"):
        seen.append(x)
        mask, negated, x = x.args[1], True, _up(x.args[0], seen)
    elif _is(x, aten.add.Tensor) and _is(_up(x.args[0], []), aten.mul.Tensor, aten.div.Tensor) \
            and isinstance(x.args[1], fx.Node) and _val(x.args[1]).dtype.is_floating_point:
        seen.append(x)
        mask, x = x.args[1], _up(x.args[0], seen)
    scale = 1.0
    if _is(x, aten.mul.Tensor, aten.div.Tensor):
        a, b = x.args[:2]
        const, other = (b, a) if isinstance(b, (int, float)) else (a, b)
        if isinstance(const, (int, float)) and isinstance(other, fx.Node):
            seen.append(x)
            scale = float(const) if x.target == aten.mul.Tensor else 1.0 / float(const)
            x = _up(other, seen)
    return mask, negated, scale, x


# -- keys and values ----------------------------------------------------------------------------

def _split_half(node: fx.Node, seen: list) -> tuple[fx.Node, int]:
    """(split node, index) for getitem(split_with_sizes(x, [dn, dv], -1), index)."""
    node = _up(node, seen)
    if _is(node, operator.getitem) and _is(node.args[0], aten.split_with_sizes.default):
        seen.append(node)
        return node.args[0], node.args[1]
    raise _NoMatch(f"{node.name} is not one half of a split of expanded keys/values")


def _expansion(split: fx.Node, seen: list) -> tuple[fx.Node, fx.Node, list[int]]:
    """split(view(linear(latent, W)) [maybe transposed]) -> (latent, W, split sizes)."""
    x = split.args[0]
    if _is(x, aten.transpose.int, aten.permute.default):
        seen.append(x)
        x = x.args[0]
    view = _up(x, seen)
    if not _is(view, aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        raise _NoMatch(f"{view.name}: keys/values are not a per-head view of a projection")
    lin = _up(view.args[0], seen)
    if not (_is(lin, aten.linear.default) and len(lin.args) == 2 and lin.args[1].op == "get_attr"):
        raise _NoMatch(f"{lin.name}: keys/values are not one bias-free linear of a weight (kv_b_proj)")
    seen += [split, view, lin]
    return lin.args[0], lin.args[1], list(split.args[1])


def _strip_expand(node: fx.Node, seen: list) -> fx.Node:
    node = _up(node, seen)
    while _is(node, aten.expand.default):
        seen.append(node)
        node = _up(node.args[0], seen)
    return node


def _value_product(softmax: fx.Node, seen: list) -> tuple[fx.Node, str, fx.Node]:
    """The one probs @ v after the softmax -> (node, its output dims, v)."""
    node = softmax
    while True:
        users = [u for u in node.users if not is_assert(u)]
        if len(users) != 1:
            raise _NoMatch(f"{node.name}: attention probabilities have {len(users)} uses, expected 1")
        node = users[0]
        if not _is(node, *_SKIP):
            break
        seen.append(node)
    if _is(node, aten.einsum.default) and len(node.args[1]) == 2:
        ins, out = node.args[0].replace(" ", "").split("->")
        p, v = ins.split(",")
        role = dict(zip(p, "bhts"))
        dims = "".join(role.get(c, "d") for c in out)
        if dims in ("bthd", "bhtd"):
            return node, dims, node.args[1][1]
    if _is(node, aten.matmul.default):
        return node, "bhtd", node.args[1]
    raise _NoMatch(f"{node.name} is not the probabilities-times-values product")


def find_site(softmax: fx.Node) -> _Site:
    """Recognise the MLA attention around one softmax node, or raise _NoMatch saying why not."""
    seen: list[fx.Node] = [softmax]
    if softmax.args[1] not in (-1, _val(softmax).dim() - 1):
        raise _NoMatch(f"{softmax.name}: softmax is not over the last (key) dim")
    mask, negated, scale, scores = _mask_and_scale(_up(softmax.args[0], seen), seen)
    (qa, ka), (qb, kb) = _terms(scores, seen)
    out, out_dims, v = _value_product(softmax, seen)
    seen.append(out)
    halves = {}
    for q, k in ((qa, ka), (qb, kb)):
        tried: list[fx.Node] = []
        try:   # the no-rope term's keys are expanded from the latent by kv_b_proj
            split, k_index = _split_half(k.node, tried)
            halves["nope"] = (q, split, k_index, *_expansion(split, tried))
            seen += tried
        except _NoMatch:
            halves["pe"] = (q, _strip_expand(k.node, seen))
    if set(halves) != {"nope", "pe"}:
        raise _NoMatch(f"{softmax.name}: not one score term with keys expanded from a latent by a linear "
                       "and one with shared rope keys")
    (q_nope, split, k_index, latent, weight, sizes), (q_pe, k_pe) = halves["nope"], halves["pe"]
    v_split, v_index = _split_half(v, seen)
    if v_split is not split or (k_index, v_index) != (0, 1):
        raise _NoMatch(f"{softmax.name}: keys and values are not the two halves of one kv_b_proj split")
    site = _Site(q_nope, q_pe, latent, k_pe, weight, mask, negated, scale, out, out_dims, seen)
    _check_shapes(site, sizes)
    return site


def _check_shapes(s: _Site, sizes: list[int]) -> None:
    qn, qp, lat, kp, w = (_val(n) for n in (s.q_nope.node, s.q_pe.node, s.latent, s.k_pe, s.weight))
    H = qn.shape[s.q_nope.dims.index("h")]
    dn, dv, R = sizes[0], sizes[1] if len(sizes) == 2 else -1, lat.shape[-1]
    problems = [
        (len(sizes) == 2 and qn.shape[-1] == dn, f"split sizes {sizes} vs q_nope head dim {qn.shape[-1]}"),
        (w.dim() == 2 and tuple(w.shape) == (H * (dn + dv), R), f"kv_b weight {tuple(w.shape)} vs "
                                                                f"[H * (dn + dv), R] = [{H * (dn + dv)}, {R}]"),
        (lat.dim() == 3 or (lat.dim() == 4 and lat.shape[1] == 1), f"latent shape {tuple(lat.shape)}"),
        (kp.dim() == 3 or (kp.dim() == 4 and kp.shape[1] == 1), f"rope key shape {tuple(kp.shape)}"),
        (qp.shape[-1] == kp.shape[-1], f"rope sizes {qp.shape[-1]} (query) vs {kp.shape[-1]} (key)"),
        (qn.dim() == 4 and qp.dim() == 4 and s.q_pe.dims == s.q_nope.dims, "query layouts differ"),
    ]
    for ok, what in problems:
        if not ok:
            raise _NoMatch(f"{s.out.name}: shapes are not MLA's: {what}")


# -- rewrite ------------------------------------------------------------------------------------

def _rewrite(gm: fx.GraphModule, s: _Site, fake) -> fx.Node:
    g = gm.graph
    op = lambda target, *args: call_op(g, fake, target, args)
    to_bthd = lambda o: o.node if o.dims == "bthd" else op(aten.permute.default, o.node, [0, 2, 1, 3])
    squeeze = lambda n: n if _val(n).dim() == 3 else op(aten.squeeze.dim, n, 1)
    H = _val(s.q_nope.node).shape[s.q_nope.dims.index("h")]
    dn = _val(s.q_nope.node).shape[-1]
    rows, R = _val(s.weight).shape
    with g.inserting_before(s.out):
        w3 = op(aten.view.default, s.weight, [H, rows // H, R])                    # [H, dn + dv, R]
        w_uk = op(aten.slice.Tensor, w3, 1, 0, dn)
        w_uv = op(aten.slice.Tensor, w3, 1, dn, rows // H)
        mask = s.mask
        if mask is not None and s.mask_negated:
            mask = mask.args[0] if _is(mask, *_NOT) else op(aten.logical_not.default, mask)
        new = op(torch.ops.graphopt.mla_attention.default, to_bthd(s.q_nope), to_bthd(s.q_pe), squeeze(s.latent),
                 squeeze(s.k_pe), s.weight, w_uk, w_uv, mask, s.scale, ABSORB_MAX_TOKENS)
        if s.out_dims == "bhtd":
            new = op(aten.permute.default, new, [0, 2, 1, 3])
    s.out.replace_all_uses_with(new)
    return new


def _erase_unused(g: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the matched nodes nothing reads any more (with the metadata asserts that check them)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    candidates = set(nodes) | {n.args[1] for n in nodes if _is(n, aten.masked_fill.Scalar)}
    for node in sorted(candidates, key=lambda n: order.get(n, -1), reverse=True):
        if node.op == "call_function" and all(is_assert(u) for u in node.users):
            for u in list(node.users):
                g.erase_node(u)
            g.erase_node(node)


# The absorbed form reassociates the kv_b_proj matmuls: a few ulps of the compute dtype (verify mode).
_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-10)}
_LOW_PRECISION = (2e-2, 1e-2)   # bf16 / fp16


class RewriteMLAAbsorbedPass(GraphPass):
    name = "rewrite_mla_absorbed"
    rtol, atol = _TOLERANCE[torch.float32]

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        fake = fake_mode_of(gm)
        done, notes = 0, []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _SOFTMAX:
                continue
            try:
                site = find_site(node)
            except _NoMatch as e:
                notes.append(f"not rewritten: {e}")
                continue
            self.rtol, self.atol = _TOLERANCE.get(_val(site.q_nope.node).dtype, _LOW_PRECISION)
            _rewrite(gm, site, fake)
            _erase_unused(gm.graph, site.visited)
            done += 1
        if done:
            gm.graph.lint()
        return PassResult(gm, modified=done > 0, matches=done, notes=notes)

