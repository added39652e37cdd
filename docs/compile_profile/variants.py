"""Formulations of the traced compiled path's branch product ``B P x`` (issue 14; none kept):
``blocks``: the eager block-diagonal bmm in the graph; ``op``: a torch.library custom op whose
backward runs grouped.grouped_input_grad / grouped_weight_grad (its input is saved); ``hybrid``:
``blocks`` where a block has fewer input than output channels, else the current formula."""
import torch
from consolidator_hf import grouped

def blocks(x, weight, geometry):
    return grouped.grouped_forward_blocks(x, weight, **geometry._asdict())

@torch.library.custom_op("cons_mb::bp", mutates_args=())
def _bp(x: torch.Tensor, weight: torch.Tensor, groups: int, shuffle: bool, offset: int, vout: int) -> torch.Tensor:
    return grouped.grouped_forward_blocks(x, weight, groups, shuffle, row_offset=offset,
                                          virtual_out_features=vout or None)
@_bp.register_fake
def _(x, weight, groups, shuffle, offset, vout):
    return x.new_empty(x.shape[0], weight.shape[0])

@torch.library.custom_op("cons_mb::bp_gx", mutates_args=())
def _bp_gx(g: torch.Tensor, weight: torch.Tensor, in_f: int, groups: int, shuffle: bool, offset: int, vout: int) -> torch.Tensor:
    return grouped.grouped_input_grad(g, weight, in_f, groups, shuffle, row_offset=offset,
                                      virtual_out_features=vout or None).contiguous()
@_bp_gx.register_fake
def _(g, weight, in_f, groups, shuffle, offset, vout):
    return g.new_empty(g.shape[0], in_f)

@torch.library.custom_op("cons_mb::bp_gw", mutates_args=())
def _bp_gw(g: torch.Tensor, x: torch.Tensor, groups: int, shuffle: bool, offset: int, vout: int) -> torch.Tensor:
    return grouped.grouped_weight_grad(g, x, groups, shuffle, row_offset=offset,
                                       virtual_out_features=vout or None).contiguous()
@_bp_gw.register_fake
def _(g, x, groups, shuffle, offset, vout):
    return g.new_empty(g.shape[1], x.shape[1] // groups)

def _setup(ctx, inputs, output):
    x, w, *meta = inputs
    ctx.save_for_backward(x, w); ctx.meta = meta
def _backward(ctx, g):
    x, w = ctx.saved_tensors
    gr, sh, off, vo = ctx.meta
    g = g.contiguous()
    gx = _bp_gx(g, w, x.shape[1], gr, sh, off, vo) if ctx.needs_input_grad[0] else None
    gw = _bp_gw(g, x, gr, sh, off, vo) if ctx.needs_input_grad[1] else None
    return gx, gw, None, None, None, None
_bp.register_autograd(_backward, setup_context=_setup)

def op(x, weight, geometry):
    return _bp(x.contiguous(), weight, geometry.groups, geometry.channel_shuffle, geometry.row_offset,
               geometry.virtual_out_features or 0)

from consolidator_hf import compiled_path as _cp
_cur = _cp.branch_product
def hybrid(x, weight, geometry):
    plan = grouped.block_plan(x.shape[1], weight.shape[0], geometry.groups,
                              row_offset=geometry.row_offset,
                              virtual_out_features=geometry.virtual_out_features)
    if plan.s < plan.rows:
        return blocks(x, weight, geometry)
    return _cur(x, weight, geometry)
