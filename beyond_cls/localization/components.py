"""Connected components of thresholded maps for all thresholds at once: runs and a batched union-find."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` along dim 0 (``index_select``: several times faster than advanced indexing on CPU)."""
    return values.index_select(0, index)


def _expand(lo: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """For ranges ``[lo_i, lo_i + count_i)``: (which range, value) of every element, ranges in order."""
    total = int(count.sum())
    which = torch.repeat_interleave(count, output_size=total)
    first = torch.cumsum(count, 0) - count
    value = torch.repeat_interleave(lo - first, count, output_size=total)
    return which, value + torch.arange(total, device=lo.device)


@dataclass
class _Runs:
    """Horizontal runs of one kind (foreground or background), sorted by (group, row, column)."""

    key_start: Tensor  # ((group * H + y) * stride + start + 2), sorted
    key_end: Tensor
    group: Tensor  # n * U + u
    y: Tensor
    start: Tensor  # first pixel, inclusive
    end: Tensor  # last pixel, inclusive


def _runs(s: Tensor, num_levels: int, background: bool) -> _Runs:
    """Runs of ``s > u`` (foreground) or ``s <= u`` (background) for every map and level index ``u``.

    Between neighbours ``a = s[x - 1]`` and ``b = s[x]`` of a row padded with 0 (never foreground), a foreground
    run starts at ``x`` for the levels ``a <= u < b`` and ends at ``x - 1`` for ``b <= u < a``. Background is the
    same with the roles of rising and falling edges swapped, padded with ``num_levels`` (never background).
    """
    n, h, w = s.shape
    stride, plane = w + 4, h * (w + 4)
    pad = num_levels if background else 0
    padded = torch.nn.functional.pad(s, (1, 1), value=pad)
    a = padded[..., :-1].reshape(-1)  # [n, h, w + 1] flattened; pair i sits between pixels i - 1 and i
    step = (padded[..., 1:] - padded[..., :-1]).reshape(-1)

    def events(rising: bool, shift: int) -> Tensor:
        flat = ((step > 0) if rising else (step < 0)).nonzero(as_tuple=True)[0]
        lo, count = _take(a, flat), _take(step, flat).abs()
        if not rising:
            lo = lo - count
        row, x = flat // (w + 1), flat % (w + 1)  # row = map * h + y
        # key = ((map * U + u) * h + y) * stride + x + shift + 2 for u in [lo, lo + count)
        base = ((row // h) * num_levels * h + row % h) * stride + x + shift + 2 + lo * plane
        total = int(count.sum())
        first = torch.cumsum(count, 0) - count
        keys = torch.repeat_interleave(base - first * plane, count, output_size=total)
        return torch.sort(keys + torch.arange(total, device=s.device) * plane).values

    key_start = events(not background, 0)
    key_end = events(background, -1)
    row = key_start // stride
    return _Runs(key_start, key_end, row // h, row % h, key_start % stride - 2, key_end % stride - 2)


def _edges(runs: _Runs, h: int, w: int, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Pairs of runs on neighbouring rows of the same map and level that touch (8- or 4-connectivity)."""
    stride, d = w + 4, int(diagonal)
    above = (runs.key_start // stride - 1) * stride + 2
    lo = torch.searchsorted(runs.key_end, above + runs.start - d, side="left")  # end >= start - d
    hi = torch.searchsorted(runs.key_start, above + runs.end + d, side="right")  # start <= end + d
    count = torch.where(runs.y > 0, (hi - lo).clamp(min=0), 0)
    which, other = _expand(lo, count)
    return which, other


def _union_find(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """Root (smallest member) of every node's component: min-root hooking + pointer jumping until stable."""
    parent = torch.arange(n, device=src.device)
    ps, pd = src, dst  # every node is its own root at first
    while ps.numel():
        parent.scatter_reduce_(0, torch.maximum(ps, pd), torch.minimum(ps, pd), "amin")
        # pointer jumping on the nodes not yet pointing at a root (a set that shrinks geometrically)
        active = (_take(parent, parent) != parent).nonzero(as_tuple=True)[0]
        while active.numel():
            up = _take(parent, _take(parent, active))
            parent.index_copy_(0, active, up)
            active = active.masked_select(_take(parent, up) != up)
        ps, pd = _take(parent, src), _take(parent, dst)
        open_ = ps != pd
        src, dst = src.masked_select(open_), dst.masked_select(open_)  # joined edges stay joined
        ps, pd = ps.masked_select(open_), pd.masked_select(open_)
    return parent


@dataclass
class _Candidates:
    """Estimated boxes of all maps and levels: one per foreground component and one per hole."""

    group: Tensor  # [M] n * U + u
    boxes: Tensor  # [M, 4] int64, official convention (right/bottom one past the last pixel, clipped)
    area: Tensor  # [M] pixels of the component (holes: 0)


def _segment(values: Tensor, index: Tensor, n: int, reduce: str) -> Tensor:
    init = torch.iinfo(torch.int64).max if reduce == "amin" else torch.iinfo(torch.int64).min
    out = torch.full((n,), init, dtype=torch.int64, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce)


def _candidates(s: Tensor, num_levels: int, holes: bool = True) -> _Candidates:
    """Boxes of every contour ``cv2.findContours(RETR_TREE)`` would return, for every map and level."""
    _, h, w = s.shape
    device = s.device
    fg = _runs(s, num_levels, background=False)
    src, dst = _edges(fg, h, w, diagonal=True)  # foreground is 8-connected
    num_fg = fg.start.numel()
    parts = [(fg.group, fg.y, fg.start, fg.end)]
    outside = [torch.zeros(num_fg, dtype=torch.bool, device=device)]
    if holes:
        bg = _runs(s, num_levels, background=True)
        a, b = _edges(bg, h, w, diagonal=False)  # background is 4-connected
        # Only runs away from the image edge can be part of a hole, so only they join the union-find; an inner
        # run next to one that reaches the edge is outside too, and so is its whole component.
        edge = (bg.start == 0) | (bg.end == w - 1) | (bg.y == 0) | (bg.y == h - 1)
        inner = (~edge).nonzero(as_tuple=True)[0]
        index = torch.full_like(bg.start, -1)
        index.index_copy_(0, inner, torch.arange(inner.numel(), device=device) + num_fg)
        edge_a, edge_b = _take(edge, a), _take(edge, b)
        both = ~edge_a & ~edge_b
        src = torch.cat([src, _take(index, a.masked_select(both))])
        dst = torch.cat([dst, _take(index, b.masked_select(both))])
        near_edge = torch.zeros_like(edge)
        near_edge.index_fill_(0, torch.where(edge_a, b, a).masked_select(edge_a ^ edge_b), True)
        parts.append(tuple(_take(v, inner) for v in (bg.group, bg.y, bg.start, bg.end)))
        outside.append(_take(near_edge, inner))
    group, y, start, end = (torch.cat(columns) for columns in zip(*parts))
    n = start.numel()
    root = _union_find(n, src, dst)
    x0, x1 = _segment(start, root, n, "amin"), _segment(end, root, n, "amax")
    y1 = _segment(y, root, n, "amax")
    area = torch.zeros(n, dtype=torch.int64, device=device).scatter_add_(0, root, end - start + 1)
    outside = _segment(torch.cat(outside).to(torch.int64), root, n, "amax") > 0
    keep = (root == torch.arange(n, device=device)) & ~outside
    # a root is its component's first run, so its row is the top row
    r = keep.nonzero(as_tuple=True)[0]
    hole = r >= num_fg
    grow = hole.to(torch.int64)  # a hole's contour runs through the foreground pixels around it
    boxes = torch.stack(
        [
            _take(x0, r) - grow,
            _take(y, r) - grow,
            torch.clamp(_take(x1, r) + 1 + grow, max=w - 1),
            torch.clamp(_take(y1, r) + 1 + grow, max=h - 1),
        ],
        1,
    )
    return _Candidates(_take(group, r), boxes, torch.where(hole, 0, _take(area, r)))


def label_components(masks: Tensor, connectivity: int = 8) -> Tensor:
    """Connected components of boolean ``[..., H, W]`` masks: each pixel gets the raster index ``y * W + x`` of
    its component's first pixel, background -1. Same runs + union-find as the box extraction."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}; expected 4 or 8")
    if masks.dim() < 2:
        raise ValueError(f"masks must be [..., H, W]; got shape {tuple(masks.shape)}")
    shape = masks.shape
    h, w = shape[-2:]
    s = masks.reshape(-1, h, w).to(torch.int64)
    runs = _runs(s, 1, background=False)
    src, dst = _edges(runs, h, w, diagonal=connectivity == 8)
    n = runs.start.numel()
    root = _union_find(n, src, dst)
    label = _take(runs.y, root) * w + _take(runs.start, root)
    which, x = _expand(runs.start, runs.end - runs.start + 1)
    out = torch.full((s.numel(),), -1, dtype=torch.int64, device=masks.device)
    out.index_copy_(0, (_take(runs.group, which) * h + _take(runs.y, which)) * w + x, _take(label, which))
    return out.reshape(shape)
