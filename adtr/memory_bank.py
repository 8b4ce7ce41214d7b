"""A memory bank of good features: the distance to the nearest one maps parts that lie anywhere.

PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
sections 3.1-3.3) keeps the features of good images' positions, thinned to a greedy k-center
coreset, and maps a position by the distance of its feature to the nearest kept one: no
position is assumed to look like the same position of another image. ADTR uses it beside the
reconstruction error where the reconstructor copies its input (the transformer without the
learnable query: ScoreConfig.nearest_map), whose map misses the defects it copies: metal_plate
AUPRO 0.9156 -> 0.9426 on one fit (docs/design.md, "The nearest good feature joins the
map of a copying model"). The bank holds PatchCore's patch features made from adtr's own
(patch_features: the stride-8 and stride-16 stages of the standardised features on the feature
grid, averaged 3x3) and has BANK_SIZE rows after a fit; an update's join may add rows
(join_memory_bank), and the run records how many (ScoreConfig.nearest_bank_rows).
A defect head in such a run reads the bank's residual, each feature minus its nearest row
(nearest_residual), beside the reconstruction residual (ScoreConfig.head_bank_residual).

The nearest row can be searched among the bank's first principal components (search_basis,
ScoreConfig.nearest_search_dims): an approximate nearest-neighbour search, the kind libraries such
as faiss offer; the distance and the residual are then the exact ones to the row found.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from adtr.config import ScoreConfig

# a fit's rows (PatchCore keeps 10% of the patches: about 5,000 of metal_plate's 50,000)
BANK_SIZE = ScoreConfig.nearest_bank_rows
MIN_STRIDE = 8  # the stages kept: PatchCore's mid-level ones (stride 8 and 16 of Lite0), section 3.1
POOL = 3  # each position averaged over its POOL x POOL neighbourhood (PatchCore's local aggregation)
CANDIDATES = 100_000  # patches the coreset is chosen from, a seeded random subset above it: bounds the fit's time
SEED = 0
# An update's join grows the bank up to this many rows (join_memory_bank): each nearest search is a
# product with every row, so inference pays in proportion (docs/design.md, "An update's memory bank grows")
MAX_ROWS = 2 * BANK_SIZE
ROW_MULTIPLE = 64  # a joined bank is padded to a multiple of this (_argmin's blocks: its fast search)
RADIUS_TOLERANCE = 1e-4  # relative, on squared distances: float32 rounding of the same distance

log = logging.getLogger(__name__)


def patch_features(features: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Standardised features (B, C, h, w) -> PatchCore's patch features (B, C - first, h, w):
    the channels from `first` on (the stages at MIN_STRIDE and coarser: ADTR.nearest_first), each
    position averaged with its POOL x POOL neighbourhood (the border over the positions it has)."""
    return F.avg_pool2d(features[:, first:], POOL, stride=1, padding=POOL // 2, count_include_pad=False)


@torch.no_grad()
def greedy_coreset(
    x: torch.Tensor,
    n: int,
    seed: int = SEED,
    projection_dim: int = 128,
    centers: torch.Tensor | None = None,
    radius: float = 0.0,
) -> torch.Tensor:
    """Indices (n,) of n rows of x (M, C) chosen by greedy k-center selection (PatchCore, section
    3.2): each step takes the row farthest from those chosen so far. Distances are measured
    after a seeded Gaussian random projection to projection_dim dimensions, as in the paper.
    centers (K, C): rows chosen before (not returned): the selection continues from them, and
    stops early, with fewer than n indices, once every row of x lies within `radius` of the
    chosen ones (a distance in the projected space: covering_radius's, compared with a relative
    tolerance of RADIUS_TOLERANCE so that rounding does not add a row); radius is read only with
    centers, and no or empty centers start from a seeded random row. Raises ValueError unless
    1 <= n <= M (0 <= n with centers)."""
    if centers is not None and not len(centers):
        centers = None
    if not (0 if centers is not None else 1) <= n <= len(x):
        raise ValueError(f"a coreset of {n} rows from {len(x)} needs 1 <= n <= {len(x)}")
    g = torch.Generator().manual_seed(seed)
    project = _projection(x.shape[1], projection_dim, g, x.device)
    x = project(x)
    sq = (x**2).sum(1)  # |x|^2 once: each step is then one matrix-vector product over x
    chosen = torch.empty(n, dtype=torch.long)
    if centers is None:
        chosen[0] = int(torch.randint(len(x), (1,), generator=g))
        dist = sq - 2 * (x @ x[chosen[0]]) + sq[chosen[0]]  # squared distances to the chosen set
        first = 1
    else:
        dist = _nearest_squared(x, project(centers.to(x.device)))
        first = 0
    step = torch.empty_like(dist)  # reused: no allocation per step (memory bandwidth bound)
    for i in range(first, n):
        c = int(dist.argmax())
        if centers is not None and float(dist[c]) <= radius**2 * (1 + RADIUS_TOLERANCE):
            return chosen[:i]  # every row is covered
        chosen[i] = c
        torch.addmv(sq, x, x[c], alpha=-2, out=step).add_(sq[c])
        torch.minimum(dist, step, out=dist)
    return chosen


def covering_radius(x: torch.Tensor, bank: torch.Tensor, seed: int = SEED, projection_dim: int = 128) -> float:
    """The largest distance of a row of x (M, C) to its nearest bank row (K, C), in greedy_coreset's
    projected space (the same seed and dimension): the radius within which a coreset of x's rows
    covers them all (M = 0: 0; ValueError for an empty bank)."""
    if not len(bank):
        raise ValueError("the covering radius of an empty bank is not defined")
    if not len(x):
        return 0.0
    project = _projection(x.shape[1], projection_dim, torch.Generator().manual_seed(seed), x.device)
    return float(_nearest_squared(project(x), project(bank.to(x.device))).max().clamp_min(0).sqrt())


def _projection(channels: int, dim: int, g: torch.Generator, device: torch.device):
    """greedy_coreset's seeded Gaussian random projection to dim dimensions (none at or under it),
    as a function of rows (M, channels) -> (M, dim) float32, contiguous."""
    if channels <= dim:
        return lambda rows: rows.float().contiguous()
    matrix = (torch.randn(channels, dim, generator=g) / math.sqrt(dim)).to(device)
    return lambda rows: (rows.float() @ matrix).contiguous()


def _nearest_squared(x: torch.Tensor, centers: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Each row's (M, D) squared distance to its nearest center (K, D), (M,), in blocks of rows:
    a (block x K) matrix at a time (_bank_products, the nearest search's own product)."""
    return torch.cat([_bank_products(b, centers).amin(-1) + (b * b).sum(-1) for b in x.split(block)])


def _candidates(features: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Features (N, C, h, w) -> one row per position (M, C), float32 on the CPU: all N*h*w of
    them, or a seeded random subset of `limit` above that, gathered without copying the rest."""
    n, c, h, w = features.shape
    flat = features.detach().flatten(2)  # (N, C, h*w), a view
    if n * h * w <= limit:
        return flat.permute(0, 2, 1).reshape(-1, c).float().cpu()
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(n * h * w, generator=g)[:limit].to(features.device)
    return flat[index // (h * w), :, index % (h * w)].float().cpu()  # (limit, C)


def _coreset_bank(candidates: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """A bank of exactly `size` rows (size, C) from candidate rows (M, C): their greedy coreset;
    fewer candidates than `size` are all kept and repeated (a repeated row changes no nearest
    distance)."""
    bank = candidates[greedy_coreset(candidates, min(size, len(candidates)), seed)]
    return bank[torch.arange(size) % len(bank)]


def fit_memory_bank(features: torch.Tensor, size: int = BANK_SIZE, seed: int = SEED) -> torch.Tensor:
    """Features of good images (N, C, h, w) -> the bank (size, C), float32 on the features'
    device: the coreset of their positions (of CANDIDATES of them, drawn with the seed, above
    that). Raises ValueError for no features."""
    if not features.numel():
        raise ValueError("a memory bank needs the features of at least one good image")
    return _coreset_bank(_candidates(features, CANDIDATES, seed), size, seed).to(features.device)


def join_memory_bank(
    bank: torch.Tensor,
    features: torch.Tensor,
    reference: torch.Tensor,
    max_rows: int = MAX_ROWS,
    seed: int = SEED,
    fit_rows: int = BANK_SIZE,
) -> torch.Tensor:
    """A fitted bank (K, C) with more good images' features (M, C, h, w) joined: (K', C), on the bank's
    device.

    A fit's bank (at most fit_rows rows: a grown one has more) that holds every position of its
    images (fewer distinct rows than K, repeated to K: a small set) is fitted again on its rows and
    the new positions, at K rows, as a fit on all the images would be. Otherwise every distinct row
    is kept, and the greedy k-center selection continues from them over the new positions until each
    lies within the bank's covering radius: the largest distance of the reference features (R, C, h,
    w), the parent's good training images (an update's replay sample), to the bank, measured as
    greedy_coreset measures (covering_radius). So the parent's rows all stay, new images like the
    parent's add few rows, and a new variant (a product change, a new lighting) is covered as
    closely as the parent's images were. Where that takes more than max_rows, the bank is instead
    the coreset of the old rows and the new positions at max_rows, and the parent's parts lose rows
    (logged). A grown bank is padded to a multiple of ROW_MULTIPLE rows by repeating rows (no
    distance changes): the nearest search's fast path. docs/design.md, "An update's memory bank
    grows"."""
    old = bank.detach().float().cpu().unique(dim=0)
    new = _candidates(features, CANDIDATES, seed)
    # a fit's bank with repeated rows holds every position of its images (a grown bank's repeats
    # are its padding, above fit_rows rows): refit on them all
    if len(old) < len(bank) <= fit_rows:
        return _coreset_bank(torch.cat([old, new]), len(bank), seed).to(bank.device)
    radius = covering_radius(_candidates(reference, CANDIDATES, seed), old, seed)
    room = max(0, max_rows - len(old))
    added = greedy_coreset(new, min(room, len(new)), seed, centers=old, radius=radius)
    if len(added) == room and room < len(new):  # the room ran out: was everything covered?
        rest = covering_radius(new, torch.cat([old, new[added]]), seed)
        if rest > radius * (1 + RADIUS_TOLERANCE):
            log.warning("the memory bank would need more than %d rows to cover the new good images as closely as "
                        "the parent's (distance %.3g against %.3g): it keeps a coreset of %d rows of the old and the "
                        "new, and the parent's parts lose rows (fit again on all the good images to avoid it)",
                        max_rows, rest, radius, max_rows)  # fmt: skip
            return _coreset_bank(torch.cat([old, new]), max_rows, seed).to(bank.device)
    joined = torch.cat([old, new[added]])
    padded = -(-len(joined) // ROW_MULTIPLE) * ROW_MULTIPLE
    return joined[torch.arange(padded) % len(joined)].to(bank.device)


def search_basis(bank: torch.Tensor, dims: int) -> torch.Tensor:
    """A bank (K, C) -> its rows' first `dims` principal directions (C, dims), orthonormal
    columns: the subspace in which nearest_rows searches. ValueError unless 1 <= dims <= min(K, C)."""
    if not 1 <= dims <= min(bank.shape):
        raise ValueError(f"a search basis of {dims} dimensions for a bank of {bank.shape[0]} rows of {bank.shape[1]} "
                         f"channels needs 1 <= dims <= {min(bank.shape)}")  # fmt: skip
    x = bank.detach().double()
    _, _, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return vt[:dims].t().to(bank.dtype).contiguous()


def _bank_products(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Rows (B, P, C) and bank (K, C) -> |b|^2 - 2 x.b for every pair (B, P, K): |x - b|^2 less
    |x|^2, which no row's order depends on. ONE matrix product, of x with a 1 appended and the bank
    with its squared norms appended (folded into a constant when exported), so the (B, P, K)
    matrix is passed once more, by the minimum, instead of three times: the bank's cost in the graph
    6.9 -> 4.7 ms per image (docs/design.md, "The nearest good feature joins the map of a copying
    model")."""
    weight = torch.cat([-2 * bank.t(), (bank * bank).sum(1, keepdim=True).t()])  # (C + 1, K)
    return torch.matmul(torch.cat([x, torch.ones_like(x[..., :1])], -1), weight)


def nearest_rows(x: torch.Tensor, bank: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Rows (B, P, C) -> the index of each one's nearest bank row (B, P) (bank (K, C)): exactly,
    or, with a search basis (C, D) (search_basis), nearest in that subspace: one matrix product of
    D + 1 instead of C + 1 columns (the bank's projection, a product of two constants in the exported
    graph, is folded by ONNX Runtime when it loads the graph)."""
    if basis is None:
        return _argmin(_bank_products(x, bank))
    return _argmin(_bank_products(x @ basis, bank @ basis))


def _argmin(d: torch.Tensor, blocks: int = 64) -> torch.Tensor:
    """The index of each row's minimum (..., K) -> (...), the first where several tie, as
    torch.argmin gives it: in two steps, the minimum of each of `blocks` blocks of the row, then the
    index inside the block that holds the smallest. ONNX Runtime's ArgMin over a long row is about
    four times slower than its ReduceMin (one pass over the (positions x rows) matrix each); ArgMin
    here runs over the block minima and over one block. K not divisible by blocks: one step."""
    k = d.shape[-1]
    if k % blocks or k <= blocks:
        return d.argmin(-1)
    split = d.reshape(*d.shape[:-1], blocks, k // blocks)
    block = split.amin(-1).argmin(-1, keepdim=True)  # (..., 1): the first block holding the minimum
    inside = torch.gather(split, -2, block.unsqueeze(-1).expand(*block.shape, k // blocks)).squeeze(-2)
    return block.squeeze(-1) * (k // blocks) + inside.argmin(-1)


def nearest_distance(features: torch.Tensor, bank: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Features (B, C, h, w) -> the Euclidean distance of each position's feature to its nearest
    bank row (B, h, w) (bank (K, C); with a search basis (C, D), to the row nearest in its
    subspace: nearest_rows). Holds a (B, h*w, K) matrix: batch the images to bound it."""
    if basis is not None:
        return torch.linalg.vector_norm(nearest_residual(features, bank, basis), dim=1)
    b, _, h, w = features.shape
    x = features.flatten(2).transpose(1, 2)  # (B, P, C)
    d2 = _bank_products(x, bank).amin(-1) + (x * x).sum(-1)
    return d2.clamp_min(0).sqrt().reshape(b, h, w)


def nearest_residual(features: torch.Tensor, bank: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Features (B, C, h, w) -> each position's feature minus its nearest bank row (B, C, h, w)
    (bank (K, C); basis as nearest_rows): the bank's residual, whose norm is nearest_distance.
    Holds a (B, h*w, K) matrix, as nearest_distance does."""
    x = features.flatten(2).transpose(1, 2)  # (B, P, C)
    nearest = bank[nearest_rows(x, bank, basis)]  # (B, P, C)
    return (x - nearest).transpose(1, 2).reshape(features.shape)
