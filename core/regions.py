"""Regions of a label map: the pixel-level steps that make a painted layout robust to specks.

A label map is int64 ``[H, W]``: each pixel's colour index (``-1``: no colour yet). A *region* is a
4-connected patch of one label. ``solid_parts`` drops the parts of every region thinner than 3 pixels
(1-2 pixel strokes, stray pixels, ragged anti-aliased edges); ``fill_from_neighbours`` gives unlabelled
pixels the label most common among their labelled 8-neighbours, ring by ring, so a removed speck takes
the colour around it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_NEIGHBOURS8 = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]


def connected_regions(labels):
    """int64 ``[H, W]``: the same positive id for exactly the pixels of one 4-connected region of equal
    labels; 0 where the label is negative.

    Each row's runs of one label are the nodes; runs that touch across two rows are joined by a parallel
    union-find (every joining pair hooks the larger root under the smaller, then every pointer jumps to
    its root; a few rounds for any picture)."""
    height, width = labels.shape
    flat = labels.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::width] = True
    run = (torch.cumsum(starts, 0) - 1).view(height, width)
    runs = int(run[-1, -1]) + 1
    starts = starts.view(height, width)
    # Runs touching across two rows overlap from a column where one of them starts: one pair each there.
    touching = (labels[1:] == labels[:-1]) & (labels[1:] >= 0) & (starts[1:] | starts[:-1])
    first, second = run[:-1][touching], run[1:][touching]
    parent = torch.arange(runs)
    while True:
        root_a, root_b = parent[first], parent[second]
        apart = root_a != root_b
        if not bool(apart.any()):
            break
        first, second, root_a, root_b = first[apart], second[apart], root_a[apart], root_b[apart]
        parent.scatter_reduce_(0, torch.maximum(root_a, root_b), torch.minimum(root_a, root_b), reduce="amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
    return torch.where(labels >= 0, parent[run] + 1, 0)


def _shifted(padded, height, width):
    return [padded[dy:dy + height, dx:dx + width] for dy, dx in _NEIGHBOURS8]


def solid_parts(labels):
    """bool ``[H, W]``: the pixels of every region that survive a 3x3 opening of that region (erosion,
    then dilation, within the region): everything thinner than 3 pixels is False. The image border
    counts as more of the same region, so a region touching it keeps its edge pixels."""
    height, width = labels.shape
    padded = F.pad(labels[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0].long()
    neighbours = _shifted(padded, height, width)
    core = torch.ones_like(labels, dtype=torch.bool)
    for neighbour in neighbours:
        core &= neighbour == labels
    padded_core = F.pad(core, (1, 1, 1, 1), value=False)
    kept = core.clone()
    for neighbour, neighbour_core in zip(neighbours, _shifted(padded_core, height, width)):
        kept |= neighbour_core & (neighbour == labels)
    return kept


def fill_from_neighbours(labels, count):
    """``labels`` with every negative pixel given a label in ``0 .. count-1``: ring by ring from the
    labelled pixels, each takes the label most common among its labelled 8-neighbours (a tie: the lower
    label). Needs at least one labelled pixel. Each ring costs only the pixels still to fill."""
    labels = labels.clone()
    height, width = labels.shape
    todo_y, todo_x = torch.nonzero(labels < 0, as_tuple=True)
    while todo_y.numel():
        around = []
        for dy, dx in _NEIGHBOURS8:
            y, x = todo_y + dy - 1, todo_x + dx - 1
            inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            around.append(torch.where(inside, labels[y.clamp(0, height - 1), x.clamp(0, width - 1)], -1))
        around = torch.stack(around, dim=1)
        valid = around >= 0
        reached = valid.any(1)
        if not bool(reached.any()):
            raise ValueError("no labelled pixel to fill from")
        around, valid = around[reached], valid[reached]
        rows = torch.arange(len(around))[:, None].expand_as(around)
        votes = torch.bincount((rows * count + around.clamp(min=0))[valid], minlength=len(around) * count)
        labels[todo_y[reached], todo_x[reached]] = votes.view(len(around), count).argmax(1)
        todo_y, todo_x = todo_y[~reached], todo_x[~reached]
    return labels


@dataclass(frozen=True)
class Region:
    label: int
    area: int          # pixels
    centre_x: float    # mean pixel position (0 = the centre of the first column)
    centre_y: float
    top: int           # first and last row it covers
    bottom: int


def region_map(labels):
    """``(index, regions)`` for a label map with every label >= 0: ``index`` (int64 ``[H, W]``) gives each
    pixel's 4-connected region as a position in ``regions``, a list of ``Region``."""
    height, width = labels.shape
    ids = connected_regions(labels).reshape(-1)
    _, inverse, areas = torch.unique(ids, return_inverse=True, return_counts=True)
    count = len(areas)
    positions = torch.arange(ids.numel())
    rows, columns = positions // width, positions % width
    sum_y = torch.zeros(count, dtype=torch.float64).index_add_(0, inverse, rows.double())
    sum_x = torch.zeros(count, dtype=torch.float64).index_add_(0, inverse, columns.double())
    top = torch.full((count,), height, dtype=torch.int64).scatter_reduce_(0, inverse, rows, "amin")
    bottom = torch.zeros(count, dtype=torch.int64).scatter_reduce_(0, inverse, rows, "amax")
    owner = torch.zeros(count, dtype=torch.int64).scatter_(0, inverse, labels.reshape(-1))
    regions = [Region(int(owner[k]), int(areas[k]), float(sum_x[k] / areas[k]), float(sum_y[k] / areas[k]),
                      int(top[k]), int(bottom[k])) for k in range(count)]
    return inverse.view(height, width), regions
