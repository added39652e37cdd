"""The index formulas of docs/DESIGN.md section 1, checked against literal loops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator_hf import grouped


def dense_by_loops(weight, in_f, g, shuffle):
    """D from the docs/DESIGN.md formulas, written as plain loops."""
    out_f, s = weight.shape
    block = torch.zeros(out_f, in_f, dtype=weight.dtype)
    for o in range(out_f):
        q = o // (out_f // g)
        for j in range(s):
            block[o, q * s + j] = weight[o, j]  # B in shuffled coordinates
    if not shuffle:
        return block
    dense = torch.zeros(out_f, in_f, dtype=weight.dtype)
    for i in range(g):
        for j in range(s):
            dense[:, i * s + j] = block[:, j * g + i]  # D[:, i*s+j] = B[:, j*g+i]
    return dense


def test_shuffle_matches_formula():
    g, s = 3, 4
    x = torch.arange(g * s).float()
    xs = grouped.channel_shuffle(x, g)
    for i in range(g):
        for j in range(s):
            assert xs[j * g + i] == x[i * s + j]
    perm = grouped.shuffle_permutation(g * s, g)
    assert torch.equal(x[perm], xs)


@pytest.mark.parametrize("shuffle", [False, True])
def test_dense_matches_loops(shuffle):
    w = torch.randn(6, 4)
    d = grouped.grouped_to_dense(w, 12, 3, shuffle)
    assert torch.equal(d, dense_by_loops(w, 12, 3, shuffle))
    assert torch.equal(grouped.dense_to_grouped(d, 3, shuffle), w)


@settings(max_examples=60, deadline=None)
@given(g=st.integers(1, 6), s=st.integers(1, 5), rows=st.integers(1, 4), shuffle=st.booleans())
def test_dense_reproduces_branch_forward(g, s, rows, shuffle):
    in_f, out_f = g * s, g * rows
    w = torch.randn(out_f, s, dtype=torch.float64)
    x = torch.randn(3, in_f, dtype=torch.float64)
    y = grouped.grouped_forward_reference(x, w, g, shuffle)
    d = grouped.grouped_to_dense(w, in_f, g, shuffle)
    torch.testing.assert_close(y, x @ d.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(d, dense_by_loops(w, in_f, g, shuffle).double())


def test_row_slices_tile_the_virtual_layer():
    """Three row slices of one grouped (3*out x in) layer give its dense matrix, stacked."""
    in_f, out_f, g = 8, 8, 4  # 24 virtual rows in blocks of 6: slices cut through blocks
    w = torch.randn(3 * out_f, in_f // g)
    full = grouped.grouped_to_dense(w, in_f, g, True)
    parts = [grouped.grouped_to_dense(w[i * out_f:(i + 1) * out_f], in_f, g, True,
                                      row_offset=i * out_f, virtual_out=3 * out_f)
             for i in range(3)]
    assert torch.equal(torch.cat(parts), full)
    x = torch.randn(5, in_f)
    y = grouped.grouped_forward_reference(x, w[out_f:2 * out_f], g, True, row_offset=out_f,
                                          virtual_out=3 * out_f)
    torch.testing.assert_close(y, x @ parts[1].T)


def test_union_support_and_split_are_exact():
    in_f, out_f = 8, 8
    idx = [grouped.support_index(in_f, out_f, g, sh) for g, sh in [(4, False), (2, False), (4, True)]]
    ws = [torch.randn(i.shape) for i in idx]
    dense = sum(grouped.grouped_to_dense(w, in_f, g, sh) for w, (g, sh) in
                zip(ws, [(4, False), (2, False), (4, True)]))
    union = grouped.union_support(idx)
    # nested supports: g=4 (no shuffle) lies inside g=2 (no shuffle)
    assert set(idx[0].flatten().tolist()) <= set(idx[1].flatten().tolist())
    assert union.numel() == len(set(torch.cat([i.flatten() for i in idx]).tolist()))
    parts = grouped.split_union(dense.flatten()[union], union, idx, out_f * in_f)
    rebuilt = sum(grouped.grouped_to_dense(w, in_f, g, sh) for w, (g, sh) in
                  zip(parts, [(4, False), (2, False), (4, True)]))
    torch.testing.assert_close(rebuilt, dense, rtol=0, atol=0)


def test_check_groups_names_layer_shape_and_group():
    with pytest.raises(ValueError, match=r"blk\.fc \(out=8, in=6\): groups=4 does not divide in_features=6"):
        grouped.check_groups(6, 8, 4, name="blk.fc")
    with pytest.raises(ValueError, match="does not divide out_features=6"):
        grouped.check_groups(8, 6, 4)
    with pytest.raises(ValueError, match="positive int"):
        grouped.check_groups(8, 8, 0)


def test_keep_mask_scale_and_rate():
    g = torch.Generator().manual_seed(0)
    m = grouped.keep_mask(20000, 0.25, generator=g)
    assert torch.equal(m.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((m > 0).float().mean().item() - 0.75) < 0.02


@pytest.mark.parametrize("batch,branches", [(1, 1), (8, 3), (5000, 2)])
def test_keep_masks_are_consecutive_keep_mask_draws(batch, branches):
    """All branches' masks in one draw: column k holds the k-th of K keep_mask draws, so the
    fast path (one draw) and a per-branch loop see the same masks under one seed."""
    got = grouped.keep_masks(batch, branches, 0.3, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    want = torch.stack([grouped.keep_mask(batch, 0.3, generator=g) for _ in range(branches)], 1)
    assert got.shape == (batch, branches) and got.dtype == torch.float32
    assert got.device.type == "cpu"
    assert torch.equal(got, want)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("row_offset,out_f,vout", [(0, 24, 24), (5, 14, 36)],
                         ids=["whole", "slice"])
def test_block_products_equal_dense_for_every_batching(shuffle, row_offset, out_f, vout):
    """The block products (forward, input gradient, weight gradient) equal the dense branch for
    every batching ``c`` of the groups, not only the one :func:`grouped.block_plan` picks, so a
    change of the picking rule cannot change a result: 12 groups, c in 1, 2, 3, 4, 6, 12; a row
    slice of a virtual layer that starts and ends inside a group (lead and trail padding)."""
    torch.manual_seed(0)
    groups, in_f, n = 12, 24, 7
    weight = torch.randn(out_f, in_f // groups, dtype=torch.float64)
    x = torch.randn(n, in_f, dtype=torch.float64)
    g = torch.randn(n, out_f, dtype=torch.float64)
    dense = grouped.grouped_to_dense(weight, in_f, groups, shuffle, row_offset=row_offset,
                                     virtual_out_features=vout)
    plan = grouped.block_plan(in_f, out_f, groups, row_offset=row_offset,
                              virtual_out_features=vout)
    n_groups = plan.last - plan.first
    batchings = [c for c in range(1, n_groups + 1) if n_groups % c == 0]
    assert len(batchings) >= 3 and plan.c in batchings
    for c in batchings:
        p = plan._replace(c=c, batches=n_groups // c)
        diagonal = grouped.block_diagonal(weight, p)
        torch.testing.assert_close(grouped.forward_blocks(x, diagonal, out_f, p, groups, shuffle),
                                   x @ dense.t(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grouped.input_grad_blocks(g, diagonal, in_f, p, shuffle),
                                   g @ dense, rtol=1e-12, atol=1e-12)
        want = grouped.dense_to_grouped(g.t() @ x, groups, shuffle, row_offset=row_offset,
                                        virtual_out_features=vout)
        torch.testing.assert_close(grouped.weight_grad_blocks(g, x, p, groups, shuffle, in_f),
                                   want, rtol=1e-12, atol=1e-12)


def test_block_plan_batches_groups_to_block_columns_inputs():
    """``block_plan`` batches the fewest neighbouring groups whose input columns reach
    ``BLOCK_COLUMNS`` (16: a 64-byte line of fp32 per row; measured fastest on every ViT-B/16
    shape, docs/block_plan/divisors.py), or all of them when no divisor does."""
    assert grouped.BLOCK_COLUMNS == 16
    picked = {shape: grouped.block_plan(*shape, 384).c
              for shape in ((768, 768), (768, 3072), (3072, 768))}  # (in, out): s = 2, 2, 8
    assert picked == {(768, 768): 8, (768, 3072): 8, (3072, 768): 2}
    assert grouped.block_plan(768, 768, 48).c == 1  # s = 16 already
    assert grouped.block_plan(768, 768, 96).c == 2  # s = 8
    plan = grouped.block_plan(12, 12, 4)  # s = 3, 4 groups: no divisor reaches 16
    assert (plan.c, plan.batches) == (4, 1)
    plan = grouped.block_plan(30, 30, 10)  # s = 3: 10 groups, divisors 1, 2, 5, 10 -> 10
    assert (plan.c, plan.batches) == (10, 1)
