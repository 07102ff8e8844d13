"""Compiled CPU kernels for Network Dissection (numba): exact top-k thresholds, and a tally that only
ever touches the pixels that fire.

A bilinear upsample (align_corners=False, edge clamped) is a convex combination of the 4 source
pixels around each output pixel, so an output pixel can exceed a unit's threshold only inside a
"cell" with a corner above it. Per (image, unit) pair the tally skips maps with no source pixel
above the threshold (most of them, at the top 0.5%), evaluates the upsampled map in float64 only
in the rows and cells that can fire, and counts the firing pixels.

Concept membership is read through one 64-bit word per pixel (bit c: concept c is labelled and
its mask covers the pixel). Each image's distinct words get small ids and a list of their concepts:
a pair's firing pixels are counted per id, a run of equal ids along a row at a time, and expanded
to concepts once per pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

WORD_BITS = 62  # concepts per word; more concepts are tallied in groups
SORTED_TOP_K = 64  # top-k buffers up to this size are kept sorted; larger ones append and select


@lru_cache(maxsize=32)
def axis_cells(n_src: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of a bilinear axis map: output pixels [lo[k], hi[k]) read source pixels max(k-1, 0) and
    min(k, n_src-1), with weight lam[y] on the second (PIL / torch align_corners=False, edge clamped)."""
    src = (np.arange(n_out) + 0.5) * (n_src / n_out) - 0.5
    cell = np.clip(np.floor(src).astype(np.int64) + 1, 0, n_src)
    lam = np.clip(src - (cell - 1), 0.0, 1.0)
    lo = np.searchsorted(cell, np.arange(n_src + 1), side="left")
    hi = np.searchsorted(cell, np.arange(n_src + 1), side="right")
    return lo.astype(np.int64), hi.astype(np.int64), lam


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _scan(values, low):
    """(values above `low`, values that are NaN or infinite), in one vectorised pass."""
    above = 0
    not_finite = 0
    for q in range(values.shape[0]):
        v = values[q]
        above += v > low
        not_finite += (v - v) != 0
    return above, not_finite


@njit(cache=True, nogil=True, error_model="numpy")
def update_top_sorted(maps, rows):
    """Fold maps (B, U, P) float32 into rows (U, k) float32 that hold, in ascending order, the k
    largest values seen per unit (-inf where empty): the layout for small k, where inserting by a
    short shift is cheapest. A map with no value above the row's smallest is skipped after one
    vectorised pass. Returns the number of NaN or infinite values (the caller raises)."""
    b_n, u_n, p_n = maps.shape
    k = rows.shape[1]
    not_finite = 0
    for b in range(b_n):
        for u in range(u_n):
            row = rows[u]
            values = maps[b, u]
            above, bad = _scan(values, row[0])
            not_finite += bad
            if above == 0:
                continue
            for q in range(p_n):
                v = values[q]
                if not v > row[0]:
                    continue
                i = 0
                while i + 1 < k and row[i + 1] < v:
                    row[i] = row[i + 1]
                    i += 1
                row[i] = v
    return not_finite


@njit(cache=True, nogil=True, error_model="numpy")
def update_top_buffered(maps, buffer, fill, floor, k):
    """Fold maps (B, U, P) float32 into per-unit buffers (U, cap) float32 that always hold the k
    largest values seen: values above the unit's `floor` are appended at `fill`, and a full buffer
    is cut back to its k largest by an in-place selection (linear time), which raises the floor to
    the k-th largest. Unused slots hold -inf. The layout for large k, where a heap's log k sift
    would dominate. Returns the number of NaN or infinite values (the caller raises)."""
    b_n, u_n, p_n = maps.shape
    cap = buffer.shape[1]
    not_finite = 0
    for b in range(b_n):
        for u in range(u_n):
            values = maps[b, u]
            low = floor[u]
            above, bad = _scan(values, low)
            not_finite += bad
            if above == 0:
                continue
            row = buffer[u]
            n = fill[u]
            for q in range(p_n):
                v = values[q]
                if v > low:
                    row[n] = v
                    n += 1
                    if n == cap:
                        low = _keep_largest(row, cap, k)
                        n = k
            fill[u] = n
            floor[u] = low
    return not_finite


@njit(cache=True, nogil=True, error_model="numpy")
def _keep_largest(row, n, k):
    """Move the k largest of row[:n] to row[:k] (in any order), set row[k:n] to -inf and return the
    k-th largest (quickselect with a median-of-three pivot)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        a, b, c = row[lo], row[mid], row[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:  # descending: values above the pivot to the left
            while row[i] > pivot:
                i += 1
            while row[j] < pivot:
                j -= 1
            if i <= j:
                row[i], row[j] = row[j], row[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            break
    kth = row[0]
    for q in range(1, k):
        kth = min(kth, row[q])
    row[k:n] = -np.inf
    return kth


@njit(cache=True, nogil=True, error_model="numpy")
def _or_shifted(plane, src, shift):
    """plane[:n] |= src << shift (a loop of its own, so that it vectorises)."""
    for x in range(src.shape[0]):
        plane[x] |= src[x] << shift


@njit(cache=True, nogil=True, error_model="numpy")
def _grown(values, capacity):
    out = np.empty(capacity, values.dtype)
    out[:len(values)] = values
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _pixel_ids(masks, labelled, first, count, p_n, width):
    """Concept membership of every pixel, compacted: ids (B, P) int32 of each pixel's word (bit j set
    where concept first + j is labelled and covers the pixel), run_end (B, P) int32 (the column where
    the run of equal ids through the pixel ends in its row), and each id's concepts as CSR (start
    (K + 1,), concept (E,)), image (K,) and pixel count (K,). Ids are unique per image and word across
    the batch; words are looked up in an open-addressing hash only where they change.

    `masks` (B, C, ceil(P / 8)) uint64 holds the 0/1 mask bytes 8 pixels at a time, so shifting a
    whole uint64 by j < 8 moves 8 pixels' bits into place at once (one byte plane per 8 concepts)."""
    b_n = masks.shape[0]
    size = 1
    while size < 2 * p_n:
        size *= 2
    shift = np.uint64(64 - int(np.log2(size)))
    keys = np.zeros(size, np.int64)
    vals = np.zeros(size, np.int32)
    stamp = np.zeros(size, np.int32)
    ids = np.empty((b_n, p_n), np.int32)
    run_end = np.empty((b_n, p_n), np.int32)
    capacity = 4096  # distinct words seen so far; grows when an image could overflow it
    distinct = np.empty(capacity, np.int64)
    image = np.empty(capacity, np.int32)
    pixels = np.empty(capacity, np.int64)
    chunk = 256  # uint64 words of 8 pixels: 2048 pixels per step, small enough to stay in L1
    groups = (count + 7) // 8
    planes = np.empty((groups, chunk), np.uint64)
    words = np.empty(8 * chunk, np.int64)
    n_ids = 0
    for b in range(b_n):
        if n_ids + p_n > capacity:
            capacity = max(2 * capacity, n_ids + p_n)
            distinct, image, pixels = _grown(distinct, capacity), _grown(image, capacity), _grown(pixels, capacity)
        last_word = np.int64(-1)
        last_id, run_start = -1, 0
        for c0 in range(0, masks.shape[2], chunk):
            n8 = min(chunk, masks.shape[2] - c0)
            planes[:, :n8] = 0
            for j in range(count):
                if labelled[b, first + j]:
                    _or_shifted(planes[j >> 3], masks[b, first + j, c0:c0 + n8], np.uint64(j & 7))
            n = min(8 * n8, p_n - 8 * c0)
            words[:n] = 0
            for g in range(groups):
                byte = planes[g].view(np.uint8)
                s = np.int64(8 * g)
                for x in range(n):
                    words[x] |= np.int64(byte[x]) << s
            p0 = 8 * c0
            for x in range(n):
                w = words[x]
                if w != last_word:
                    if last_id >= 0:
                        pixels[last_id] += p0 + x - run_start
                    run_start = p0 + x
                    slot = np.int64((np.uint64(w) * np.uint64(0x9E3779B97F4A7C15)) >> shift)
                    while stamp[slot] == b + 1 and keys[slot] != w:
                        slot = (slot + 1) & (size - 1)
                    if stamp[slot] != b + 1:
                        stamp[slot] = b + 1
                        keys[slot] = w
                        vals[slot] = n_ids
                        distinct[n_ids] = w
                        image[n_ids] = b
                        pixels[n_ids] = 0
                        n_ids += 1
                    last_word = w
                    last_id = vals[slot]
                ids[b, p0 + x] = last_id
        pixels[last_id] += p_n - run_start
        for r0 in range(0, p_n, width):
            end = width
            for x in range(width - 1, -1, -1):
                if x < width - 1 and ids[b, r0 + x] != ids[b, r0 + x + 1]:
                    end = x + 1
                run_end[b, r0 + x] = end
    start = np.zeros(n_ids + 1, np.int64)
    for k in range(n_ids):
        w = distinct[k]
        c = 0
        while w != 0:
            c += w & 1
            w >>= 1
        start[k + 1] = start[k] + c
    concept = np.empty(start[n_ids], np.int64)
    for k in range(n_ids):
        w = distinct[k]
        j = 0
        e = start[k]
        while w != 0:
            if w & 1:
                concept[e] = j
                e += 1
            w >>= 1
            j += 1
    return ids, run_end, start, concept, image[:n_ids], pixels[:n_ids]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _add_pixels(counts, touched, n_touched, ids, run_end, base, x0, x1):
    """Add row pixels [x0, x1) (offset `base` into the image) to the pair's pixel counts per concept-set
    id, one run of equal ids at a time; `touched` lists the ids counted so far. Returns n_touched."""
    x = x0
    while x < x1:
        end = min(run_end[base + x], x1)
        word_id = ids[base + x]
        if counts[word_id] == 0:
            touched[n_touched] = word_id
            n_touched += 1
        counts[word_id] += end - x
        x = end
    return n_touched


@njit(cache=True, nogil=True, error_model="numpy")
def _tally_pairs(acts, fires, thresholds, y_lo, y_hi, y_lam, x_lo, x_hi, x_lam, x_scale, ids, run_end, start, concept,
                 first, inter, area):
    """Add every firing pixel of every (image, unit) pair in `fires` to inter (U, C) and area (B, U).

    Per output row, the source rows interpolated to it give a piecewise-linear profile over the
    source columns; within each column cell the profile is monotone, so the pixels above the
    threshold are a prefix or a suffix of the cell: the crossing is estimated, then settled with
    the exact per-pixel comparison. Adjacent pieces merge into one interval per row."""
    b_n, u_n, h, w = acts.shape
    width = x_lam.shape[0]
    inv_scale = 1.0 / x_scale
    row_hot = np.zeros(h, np.bool_)
    profile = np.empty(w, np.float64)
    counts = np.zeros(len(start) - 1, np.int64)  # one pair's firing pixels per concept-set id
    touched = np.empty(len(start) - 1, np.int64)
    for b in range(b_n):
        image_ids, image_ends = ids[b], run_end[b]
        for u in range(u_n):
            if not fires[b, u]:
                continue
            t = thresholds[u]
            a = acts[b, u]
            i_min, i_max, j_min, j_max = h, -1, w, -1
            for i in range(h):
                any_hot = False
                for j in range(w):
                    if a[i, j] > t:
                        any_hot = True
                        j_min, j_max = min(j_min, j), max(j_max, j)
                row_hot[i] = any_hot
                if any_hot:
                    i_min, i_max = min(i_min, i), max(i_max, i)
            c_lo, c_hi = max(j_min - 1, 0), min(j_max + 1, w - 1)  # the columns the hot cells read
            n = 0
            n_touched = 0
            for ky in range(i_min, i_max + 2):  # the row cells around the hot source rows
                ra, rb = max(ky - 1, 0), min(ky, h - 1)
                if not (row_hot[ra] or row_hot[rb]):
                    continue
                # column j's profile is linear in the row weight lam, so the rows that can fire are
                # those with lam below `falling` or above `rising` (a margin absorbs rounding)
                falling, rising = -1.0, 2.0
                for j in range(c_lo, c_hi + 1):
                    p0, p1 = a[ra, j], a[rb, j]
                    if p0 > t and p1 > t:
                        falling = 2.0
                    elif p0 > t:
                        falling = max(falling, (p0 - t) / (p0 - p1))
                    elif p1 > t:
                        rising = min(rising, (t - p0) / (p1 - p0))
                falling, rising = falling + 1e-9, rising - 1e-9
                for y in range(y_lo[ky], y_hi[ky]):
                    lam = y_lam[y]
                    if falling <= lam <= rising:
                        continue
                    top = -np.inf
                    for j in range(c_lo, c_hi + 1):
                        profile[j] = (1.0 - lam) * a[ra, j] + lam * a[rb, j]
                        top = max(top, profile[j])
                    if top <= t:
                        continue
                    base = y * width
                    seg0, seg1 = 0, 0
                    for kx in range(j_min, j_max + 2):
                        left, right = profile[max(kx - 1, 0)], profile[min(kx, w - 1)]
                        if left <= t and right <= t:
                            continue
                        lo, hi = x_lo[kx], x_hi[kx]
                        if (left > t and right > t) or left == right:
                            x0, x1 = lo, hi
                        else:
                            cross = (t - left) / (right - left)  # the weight at which the profile meets t
                            edge = min(max(int((cross + kx - 0.5) * inv_scale + 0.5), lo), hi)  # first past it
                            if right > left:
                                while edge > lo and (1.0 - x_lam[edge - 1]) * left + x_lam[edge - 1] * right > t:
                                    edge -= 1
                                while edge < hi and not (1.0 - x_lam[edge]) * left + x_lam[edge] * right > t:
                                    edge += 1
                                x0, x1 = edge, hi
                            else:
                                while edge > lo and not (1.0 - x_lam[edge - 1]) * left + x_lam[edge - 1] * right > t:
                                    edge -= 1
                                while edge < hi and (1.0 - x_lam[edge]) * left + x_lam[edge] * right > t:
                                    edge += 1
                                x0, x1 = lo, edge
                        if x1 <= x0:
                            continue
                        if x0 == seg1:
                            seg1 = x1
                        else:
                            n_touched = _add_pixels(counts, touched, n_touched, image_ids, image_ends, base, seg0, seg1)
                            n += seg1 - seg0
                            seg0, seg1 = x0, x1
                    n_touched = _add_pixels(counts, touched, n_touched, image_ids, image_ends, base, seg0, seg1)
                    n += seg1 - seg0
            area[b, u] = n
            for t_i in range(n_touched):  # the pair's pixels per concept set, added to its concepts
                word_id = touched[t_i]
                for e in range(start[word_id], start[word_id + 1]):
                    inter[u, first + concept[e]] += counts[word_id]
                counts[word_id] = 0


@dataclass(frozen=True)
class MaskIndex:
    """A batch's masks as per-pixel concept-set ids, built once and shared by every layer dissected on
    the batch: per group of up to WORD_BITS concepts (first concept, ids, run ends, CSR start and
    concepts), and the labelled mask areas (B, C)."""

    shape: tuple[int, int, int, int]
    groups: tuple[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    mask_area: np.ndarray


def mask_index(masks: np.ndarray, labelled: np.ndarray) -> MaskIndex:
    """Index masks (B, C, H, W) bool, counting a concept only where `labelled` (B, C) is set."""
    b, c, hm, wm = masks.shape
    flat = np.ascontiguousarray(masks, dtype=np.bool_).reshape(b, c, hm * wm)
    if (hm * wm) % 8:
        flat = np.concatenate([flat, np.zeros((b, c, -(hm * wm) % 8), np.bool_)], axis=2)
    flat = flat.view(np.uint64)
    labelled = np.ascontiguousarray(labelled, dtype=np.bool_)
    groups = []
    mask_area = np.zeros((b, c), np.int64)
    for first in range(0, max(c, 1), WORD_BITS):
        ids, run_end, start, concept, image, pixels = _pixel_ids(flat, labelled, first, min(WORD_BITS, c - first),
                                                                 hm * wm, wm)
        _mask_areas(start, concept, image, pixels, first, mask_area)
        groups.append((first, ids, run_end, start, concept))
    return MaskIndex((b, c, hm, wm), tuple(groups), mask_area)


def tally(acts: np.ndarray, thresholds: np.ndarray, index: MaskIndex, fires: np.ndarray,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections (U, C), firing areas (B, U) and labelled mask areas (B, C), int64, of acts
    (B, U, h, w) float32 thresholded at `thresholds` (U,) float64 after bilinear upsampling to the
    indexed masks' size. `fires` (B, U) bool: the maps with a source value above their threshold
    (the caller has the maxima); no other map can fire after upsampling."""
    acts = np.ascontiguousarray(acts, dtype=np.float32)
    b, u, h, w = acts.shape
    _, c, hm, wm = index.shape
    if index.shape[0] != b:
        raise ValueError(f"the mask index holds {index.shape[0]} images but the activations {b}")
    thresholds = np.ascontiguousarray(thresholds, dtype=np.float64)
    fires = np.ascontiguousarray(fires, dtype=np.bool_)
    y_lo, y_hi, y_lam = axis_cells(h, hm)
    x_lo, x_hi, x_lam = axis_cells(w, wm)
    inter = np.zeros((u, c), np.int64)
    area = np.zeros((b, u), np.int64)
    for first, ids, run_end, start, concept in index.groups:
        _tally_pairs(acts, fires, thresholds, y_lo, y_hi, y_lam, x_lo, x_hi, x_lam, w / wm, ids, run_end, start,
                     concept, first, inter, area if first == 0 else np.zeros((b, u), np.int64))
    return inter, area, index.mask_area


@njit(cache=True, nogil=True, error_model="numpy")
def _mask_areas(start, concept, image, pixels, first, out):
    for k in range(len(image)):
        for e in range(start[k], start[k + 1]):
            out[image[k], first + concept[e]] += pixels[k]
