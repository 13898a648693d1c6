"""The duplicate check's inner loops compiled by numba: one level of the alignment's
robust Gauss-Newton refinement, the robust gain and offset fit, the agreement's robust
chroma fit and per-patch counts, the geometric check's choice among its RANSAC
hypotheses, and the Gaussian blur of the captures' levels and chroma.

:func:`ghostmatch.dupes.samecapture.align` spends most of a pair's check in these steps: a
step is a few dozen passes over a few thousand pixels, and in numpy each pass costs more
to call than to compute. Compiled, a step is one pass or two; the agreement's chroma fit
and patch counts are the same kind of loop. The numpy code (``samecapture._refine``,
``_robust_fit``, ``_chroma_fit``, ``_patch_counts``) stays the reference, and the path
taken where numba is missing; the two agree to rounding (``tests/test_gaussnewton.py``).
So does ``verify._fit_picked``'s, whose hypotheses (a few hundred affines, each scored on
a few dozen matches) numpy scores as one error matrix in about a millisecond.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np

# The robust scale's sample, the Tukey constant and the moments' layout are the numpy
# steps' own (numba reads module globals as constants when it compiles).
from ghostmatch.dupes.samecapture import _OUTER, PATCHES, SCALE_SAMPLES, TUKEY
from ghostmatch.dupes.verify import MAX_ANISOTROPY, MAX_SCALE

numba: Any
try:
    numba = importlib.import_module("numba")
except ImportError:  # the numpy steps run instead
    numba = None

# ``a * b + c`` rounded once (a fused multiply-add), for floats of one type: compiled code
# only (``sample``, which runs only compiled).
_fma: Any = None
if numba is not None:
    from numba.core import types as _types
    from numba.core.extending import intrinsic

    def _fused(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        if not (a == b == c and isinstance(a, _types.Float)):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fma(*args)

        return a(a, b, c), codegen

    _fma = intrinsic(_fused)


# What a step adds to the normal equations' diagonal (``samecapture._REGULARISED``).
REGULARISED = 1e-6

_F = TypeVar("_F", bound=Callable[..., Any])


def _compiled(function: _F) -> _F:
    """``function`` compiled on first call (kept in numba's cache), as it is without numba.
    Fast maths lets sums run in any order: the maps still land within a hundredth of a pixel
    of the numpy steps' (``tests/test_gaussnewton.py``)."""
    if numba is None:
        return function
    compile_ = numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
    return cast(_F, compile_(function))


@_compiled
def steps(
    t: np.ndarray,
    stack: np.ndarray,
    design: np.ndarray,
    p: np.ndarray,
    most: int,
    done: float,
) -> None:
    """Up to ``most`` robust Gauss-Newton steps of the affine map ``p`` (2 x 3, float64,
    updated in place) taking the kept level ``t`` (n,) at its pixel centres ``design``
    (n, 3: x, y, 1 in unit coordinates) onto ``stack`` (3, h, w: grey, x and y gradients);
    stops once no parameter moves by ``done`` or fewer than 16 pixels fall inside."""
    n = t.shape[0]
    _, ho, wo = stack.shape
    grey = np.empty(n)
    gx = np.empty(n)
    gy = np.empty(n)
    weight = np.empty(n)
    inside = np.zeros(n, np.bool_)
    sample = np.empty(n)
    edge_x, edge_y = 1.0 - 1.0 / wo, 1.0 - 1.0 / ho
    for _ in range(most):
        # The other image, bilinear and clamped at its border (as torch's grid_sample with
        # padding "border", corners not aligned), at the mapped pixel centres; with the
        # sums of a gain and offset fit over the pixels inside.
        count = 0
        st = si = sii = sti = 0.0
        for k in range(n):
            x, y = np.float64(design[k, 0]), np.float64(design[k, 1])
            ux = 2.0 * (p[0, 0] * x + p[0, 1] * y + p[0, 2]) - 1.0
            uy = 2.0 * (p[1, 0] * x + p[1, 1] * y + p[1, 2]) - 1.0
            ix = min(max(((ux + 1.0) * wo - 1.0) / 2.0, 0.0), wo - 1.0)
            iy = min(max(((uy + 1.0) * ho - 1.0) / 2.0, 0.0), ho - 1.0)
            x0, y0 = int(ix), int(iy)
            fx, fy = ix - x0, iy - y0
            x1, y1 = min(x0 + 1, wo - 1), min(y0 + 1, ho - 1)
            a, b = (1.0 - fx) * (1.0 - fy), fx * (1.0 - fy)
            c, d = (1.0 - fx) * fy, fx * fy
            g = a * stack[0, y0, x0] + b * stack[0, y0, x1] + c * stack[0, y1, x0]
            grey[k] = g + d * stack[0, y1, x1]
            h = a * stack[1, y0, x0] + b * stack[1, y0, x1] + c * stack[1, y1, x0]
            gx[k] = h + d * stack[1, y1, x1]
            v = a * stack[2, y0, x0] + b * stack[2, y0, x1] + c * stack[2, y1, x0]
            gy[k] = v + d * stack[2, y1, x1]
            within = abs(ux) <= edge_x and abs(uy) <= edge_y
            inside[k] = within
            if within:
                count += 1
                tk, ik = np.float64(t[k]), grey[k]
                st += tk
                si += ik
                sii += ik * ik
                sti += tk * ik
        if count < 16:
            return
        # One reweighting per step (the steps iterate the robust fit): gain and offset
        # over the pixels inside, Tukey weights at the residuals' robust scale, gain and
        # offset again under them.
        gain, offset = _gain_offset(count, st, si, sii, sti)
        stride = max(1, count // SCALE_SAMPLES)
        m = 0
        for k in range(0, n, stride):
            if inside[k]:
                sample[m] = abs(t[k] - (gain * grey[k] + offset))
                m += 1
        scale = max(1.4826 * _median(sample[:m]), 1e-3)
        spread = 1.0 / (TUKEY * scale) ** 2
        sw = st = si = sii = sti = 0.0
        for k in range(n):
            w = 0.0
            if inside[k]:
                e = t[k] - (gain * grey[k] + offset)
                u = 1.0 - e * e * spread
                if u > 0.0:
                    w = u * u
                    tk, ik = np.float64(t[k]), grey[k]
                    sw += w
                    st += w * tk
                    si += w * ik
                    sii += w * ik * ik
                    sti += w * tk * ik
            weight[k] = w
        gain, offset = _gain_offset(sw, st, si, sii, sti)
        # Normal equations of the six affine parameters: the Jacobian row of a pixel is
        # the gain times (gx d, gy d) with d = (x, y, 1); the sums of gx^2, gx gy and gy^2
        # against the moments (xx, xy, x, yy, y, 1), and of gx r, gy r against d: scalar
        # sums, kept in registers.
        a0 = a1 = a2 = a3 = a4 = a5 = 0.0
        b0 = b1 = b2 = b3 = b4 = b5 = 0.0
        c0 = c1 = c2 = c3 = c4 = c5 = 0.0
        g0 = g1 = g2 = g3 = g4 = g5 = 0.0
        for k in range(n):
            w = weight[k]
            if w == 0.0:
                continue
            e = t[k] - (gain * grey[k] + offset)
            x, y = np.float64(design[k, 0]), np.float64(design[k, 1])
            wx, wy = gx[k] * w, gy[k] * w
            pa, pb, pc = wx * gx[k], wx * gy[k], wy * gy[k]
            xx, xy, yy = x * x, x * y, y * y
            a0 += pa * xx
            a1 += pa * xy
            a2 += pa * x
            a3 += pa * yy
            a4 += pa * y
            a5 += pa
            b0 += pb * xx
            b1 += pb * xy
            b2 += pb * x
            b3 += pb * yy
            b4 += pb * y
            b5 += pb
            c0 += pc * xx
            c1 += pc * xy
            c2 += pc * x
            c3 += pc * yy
            c4 += pc * y
            c5 += pc
            ex, ey = wx * e, wy * e
            g0 += ex * x
            g1 += ex * y
            g2 += ex
            g3 += ey * x
            g4 += ey * y
            g5 += ey
        sums = np.array(
            [[a0, a1, a2, a3, a4, a5], [b0, b1, b2, b3, b4, b5], [c0, c1, c2, c3, c4, c5]]
        )
        gradient = np.array([g0, g1, g2, g3, g4, g5])
        hessian = np.empty((6, 6))
        for row in range(6):
            for col in range(6):
                which = (row >= 3) + (col >= 3)
                hessian[row, col] = sums[which, _OUTER[row % 3, col % 3]] * gain * gain
            hessian[row, row] += REGULARISED
        gradient *= gain
        step = _solve(hessian, gradient)
        largest = 0.0
        for i in range(6):
            p[i // 3, i % 3] += step[i]
            largest = max(largest, abs(step[i]))
        if largest < done:
            return


@_compiled
def _gain_offset(sw: float, st: float, si: float, sii: float, sti: float) -> tuple[float, float]:
    """Gain and offset taking i to t by weighted least squares, from the weights' sum and
    the weighted sums of t, i, i * i and t * i."""
    if sw <= 0.0:
        return 1.0, 0.0
    mt, mi = st / sw, si / sw
    var = sii / sw - mi * mi
    gain = (sti / sw - mt * mi) / var if var > 1e-9 else 0.0
    return gain, mt - gain * mi


@_compiled
def robust_fit(
    t: np.ndarray, i: np.ndarray, inside: np.ndarray, rounds: int, r: np.ndarray, weight: np.ndarray
) -> float:
    """Gain and offset taking ``i`` to ``t`` over the pixels ``inside``, refitted ``rounds``
    times with Tukey weights at the residuals' robust scale: writes the residuals ``t -
    (gain * i + offset)`` into ``r`` and the last weights into ``weight``, returns the gain
    (``samecapture._robust_fit``'s numpy steps, compiled)."""
    n = t.shape[0]
    count = 0
    for k in range(n):
        weight[k] = 1.0 if inside[k] else 0.0
        count += inside[k]
    if count == 0:
        for k in range(n):
            r[k] = t[k] - i[k]
        return 1.0
    sample = np.empty(n)
    stride = max(1, count // SCALE_SAMPLES)
    gain, offset = _weighted_fit(t, i, weight)
    for _ in range(rounds):
        m = 0
        for k in range(0, n, stride):
            if inside[k]:
                sample[m] = abs(t[k] - (gain * i[k] + offset))
                m += 1
        scale = max(1.4826 * _median(sample[:m]), 1e-3)
        spread = 1.0 / (TUKEY * scale) ** 2
        for k in range(n):
            e = t[k] - (gain * i[k] + offset)
            u = 1.0 - e * e * spread
            weight[k] = u * u if u > 0.0 and inside[k] else 0.0
        gain, offset = _weighted_fit(t, i, weight)
    for k in range(n):
        r[k] = t[k] - (gain * i[k] + offset)
    return gain


def _exact(function: _F) -> _F:
    """``function`` compiled as :func:`_compiled` does, but without fast maths: each sum and
    product rounds as written, as numpy's do."""
    if numba is None:
        return function
    return cast(_F, numba.njit(cache=True, nogil=True, error_model="numpy")(function))


@_exact
def best_triple(src: np.ndarray, dst: np.ndarray, picks: np.ndarray, limit: float) -> int:
    """The row of ``picks`` (k, 3: indices of ``src`` and ``dst``, (n, 2) points) whose
    affine taking its three ``src`` points onto their ``dst`` points is plausible and
    takes the most points to a squared offset of at most ``limit`` from theirs, the first
    on a tie; -1 when no triple's is plausible (``verify._fit_picked``'s hypotheses, one
    at a time)."""
    best, most = -1, -1
    for k in range(picks.shape[0]):
        a, b, c = picks[k, 0], picks[k, 1], picks[k, 2]
        # The edges from the first point, as columns, and their images; the 2 x 2 inverse
        # by its adjugate (``verify._affines_from_triples``).
        p00, p01 = src[b, 0] - src[a, 0], src[c, 0] - src[a, 0]
        p10, p11 = src[b, 1] - src[a, 1], src[c, 1] - src[a, 1]
        q00, q01 = dst[b, 0] - dst[a, 0], dst[c, 0] - dst[a, 0]
        q10, q11 = dst[b, 1] - dst[a, 1], dst[c, 1] - dst[a, 1]
        det = p00 * p11 - p01 * p10
        if abs(det) <= 1e-9:
            continue
        i00, i01, i10, i11 = p11 / det, -p01 / det, -p10 / det, p00 / det
        m00, m01 = q00 * i00 + q01 * i10, q00 * i01 + q01 * i11
        m10, m11 = q10 * i00 + q11 * i10, q10 * i01 + q11 * i11
        m02 = dst[a, 0] - (m00 * src[a, 0] + m01 * src[a, 1])
        m12 = dst[a, 1] - (m10 * src[a, 0] + m11 * src[a, 1])
        # ``verify.plausible``: bounded scale and aspect change, no mirror.
        d = m00 * m11 - m01 * m10
        frobenius = m00 * m00 + m01 * m01 + m10 * m10 + m11 * m11
        root = np.sqrt(max(frobenius * frobenius - 4.0 * d * d, 0.0))
        big = np.sqrt((frobenius + root) / 2.0)
        small = np.sqrt(max((frobenius - root) / 2.0, 0.0))
        if not (
            d > 0 and small >= 1 / MAX_SCALE and big <= MAX_SCALE and big <= MAX_ANISOTROPY * small
        ):
            continue
        count = 0
        for j in range(src.shape[0]):
            ox = m00 * src[j, 0] + m01 * src[j, 1] + m02 - dst[j, 0]
            oy = m10 * src[j, 0] + m11 * src[j, 1] + m12 - dst[j, 1]
            count += ox * ox + oy * oy <= limit
        if count > most:
            best, most = k, count
    return best


@_exact
def _reflected(m: int, n: int) -> int:
    """Index ``m`` of a line of ``n`` samples extended by reflection (d c b a | a b c d |
    d c b a, scipy.ndimage's ``reflect``), repeated for a line shorter than the kernel."""
    q = m % (2 * n)
    return 2 * n - 1 - q if q >= n else q


@_exact
def _blur_down(image: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """The symmetric ``weights`` (odd length) correlated down the columns of ``image``
    (h, w), written transposed into ``out`` (w, h), in its dtype: every output sample as
    scipy.ndimage's 1-d correlation forms it (in double: the centre times its weight,
    then each pair of samples at one distance, the farthest first, summed before their
    weight multiplies them), so that the values are the same to the bit."""
    h, w = image.shape
    r = (weights.shape[0] - 1) // 2
    total = np.empty(w)
    centre = weights[r]
    for i in range(h):
        for j in range(w):
            total[j] = np.float64(image[i, j]) * centre
        for k in range(r, 0, -1):
            above, below = _reflected(i - k, h), _reflected(i + k, h)
            weight = weights[r - k]
            for j in range(w):
                total[j] += (np.float64(image[above, j]) + np.float64(image[below, j])) * weight
        for j in range(w):
            out[j, i] = total[j]


@_exact
def blur(image: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """``scipy.ndimage.gaussian_filter(image, sigma)`` of a 2-d float ``image`` into ``out``
    (its shape and dtype), for ``weights`` its Gaussian kernel (``samecapture._gaussian``):
    down the columns, then along the rows, through an array of the image's dtype, as
    scipy filters one axis after the other. The same values to the bit, in a third of
    the time (scipy's line buffers cost more than the sums on images this small)."""
    h, w = image.shape
    across = np.empty((w, h), image.dtype)
    _blur_down(image, weights, across)
    _blur_down(across, weights, out)


@_exact
def sample(stack: np.ndarray, grid: np.ndarray, out: np.ndarray) -> None:
    """Bilinear samples ``out`` (c, n) of a (c, h, w) ``stack`` at ``grid`` (n, 2: x, y from
    -1 to 1 across the image, of the stack's dtype), clamped at the border: torch's
    ``grid_sample`` (bilinear, padding ``border``, corners not aligned) on the CPU, the same
    values to the bit. Its kernel rounds as it is compiled there: the pixel coordinate and
    each corner after the first added by fused multiply-adds."""
    c, h, w = stack.shape
    one, zero = stack.dtype.type(1), stack.dtype.type(0)
    less_half = -stack.dtype.type(0.5)
    across = stack.dtype.type(w) / stack.dtype.type(2)
    down = stack.dtype.type(h) / stack.dtype.type(2)
    right, bottom = stack.dtype.type(w - 1), stack.dtype.type(h - 1)
    for k in range(grid.shape[0]):
        x = min(right, max(_fma(grid[k, 0] + one, across, less_half), zero))
        y = min(bottom, max(_fma(grid[k, 1] + one, down, less_half), zero))
        left, top = np.floor(x), np.floor(y)
        fx, fy = x - left, y - top
        ex, sy = one - fx, one - fy
        nw, ne, sw, se = sy * ex, sy * fx, fy * ex, fy * fx
        x0, y0 = int(left), int(top)
        # A corner past the last pixel weighs nothing, and reads as zero.
        east, south = x0 + 1 < w, y0 + 1 < h
        x1, y1 = x0 + 1, y0 + 1
        for ch in range(c):
            v = stack[ch, y0, x0] * nw
            v = _fma(stack[ch, y0, x1] if east else zero, ne, v)
            v = _fma(stack[ch, y1, x0] if south else zero, sw, v)
            out[ch, k] = _fma(stack[ch, y1, x1] if east and south else zero, se, v)


@_exact
def area(planes: np.ndarray, out: np.ndarray) -> None:
    """``planes`` (c, h, w) averaged down to ``out``'s size (c, h', w'): torch's
    ``interpolate`` in mode ``area`` (adaptive average pooling) on the CPU, the same values
    to the bit: each output pixel the sum of its window row by row, divided by the
    window's height, then by its width."""
    c, h, w = planes.shape
    _, oh, ow = out.shape
    for ch in range(c):
        for i in range(oh):
            top, bottom = (i * h) // oh, -(-((i + 1) * h) // oh)
            for j in range(ow):
                left, right = (j * w) // ow, -(-((j + 1) * w) // ow)
                total = planes.dtype.type(0)
                for y in range(top, bottom):
                    for x in range(left, right):
                        total += planes[ch, y, x]
                total /= planes.dtype.type(bottom - top)
                out[ch, i, j] = total / planes.dtype.type(right - left)


@_compiled
def patch_counts(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """How many pixels of the (h, w) ``mask`` fall in each patch of a ``PATCHES`` x
    ``PATCHES`` grid, flattened (``rows`` and ``cols`` give each pixel row's and column's
    patch row and column: ``samecapture._patch_counts``)."""
    h, w = mask.shape
    counts = np.zeros(PATCHES * PATCHES, np.int64)
    for y in range(h):
        first = rows[y] * PATCHES
        for x in range(w):
            if mask[y, x]:
                counts[first + cols[x]] += 1
    return counts


@_compiled
def _tukey_weights(r: np.ndarray, inside: np.ndarray, count: int, weight: np.ndarray) -> None:
    """Tukey weights of residuals ``r`` at their robust scale (the median absolute value
    of every stride-th pixel inside), written into ``weight`` (``samecapture._tukey``)."""
    n = r.shape[0]
    stride = max(1, count // SCALE_SAMPLES)
    sample = np.empty((n + stride - 1) // stride)
    m = 0
    for k in range(0, n, stride):
        if inside[k]:
            sample[m] = abs(r[k])
            m += 1
    scale = max(1.4826 * _median(sample[:m]), 1e-3)
    spread = 1.0 / (TUKEY * scale) ** 2
    for k in range(n):
        u = 1.0 - np.float64(r[k]) * np.float64(r[k]) * spread
        weight[k] = u * u if u > 0.0 and inside[k] else 0.0


@_compiled
def chroma_fit(
    source: np.ndarray, target: np.ndarray, inside: np.ndarray, rounds: int, r: np.ndarray
) -> None:
    """``rounds`` fits of one complex gain taking the chroma ``source`` to ``target`` over
    the pixels ``inside``, the first with equal weights and each next with Tukey weights
    of the one before's residuals; writes the last fit's residual magnitudes into ``r``
    (``samecapture._one_colour_change``'s fit)."""
    n = source.shape[0]
    weight = np.empty(n)
    count = 0
    for k in range(n):
        weight[k] = 1.0 if inside[k] else 0.0
        count += inside[k]
    for round_ in range(rounds):
        power = across = down = 0.0
        for k in range(n):
            w = weight[k]
            if w != 0.0:
                s, t = source[k], target[k]
                power += w * (s.real * s.real + s.imag * s.imag)
                across += w * (s.real * t.real + s.imag * t.imag)
                down += w * (s.real * t.imag - s.imag * t.real)
        gain = complex(across, down) / power if power > 1e-12 else 0j
        for k in range(n):
            # |target - gain * source| by its parts: complex abs calls hypot, which guards
            # against overflows that chroma (a few units at most) never comes near, at
            # several times the cost.
            e = target[k] - gain * source[k]
            r[k] = np.sqrt(e.real * e.real + e.imag * e.imag)
        if round_ < rounds - 1:
            _tukey_weights(r, inside, count, weight)


@_compiled
def _weighted_fit(t: np.ndarray, i: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Gain and offset taking ``i`` to ``t`` by weighted least squares."""
    sw = st = si = sii = sti = 0.0
    for k in range(t.shape[0]):
        w = np.float64(weight[k])
        if w != 0.0:
            tk, ik = np.float64(t[k]), np.float64(i[k])
            sw += w
            st += w * tk
            si += w * ik
            sii += w * ik * ik
            sti += w * tk * ik
    return _gain_offset(sw, st, si, sii, sti)


@_compiled
def _median(values: np.ndarray) -> float:
    """The median of ``values`` (reordered in place; 0 for none), the mean of the two middle
    values for an even count, by selection (Hoare's): compiled, far less to compile than
    numpy's own."""
    n = values.shape[0]
    if n == 0:
        return 0.0
    upper = _select(values, n // 2)
    if n % 2:
        return upper
    # The lower middle value is the largest of those the selection put below it.
    return (values[: n // 2].max() + upper) / 2.0


@_compiled
def _select(values: np.ndarray, k: int) -> float:
    """The ``k``-th smallest of ``values``, which are partly reordered around it."""
    low, high = 0, values.shape[0] - 1
    while low < high:
        pivot = values[(low + high) // 2]
        i, j = low, high
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if k <= j:
            high = j
        elif k >= i:
            low = i
        else:
            break
    return values[k]


@_compiled
def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a x = b`` for a small square ``a`` by Gaussian elimination with partial pivoting
    (``a`` and ``b`` are overwritten)."""
    n = b.shape[0]
    for col in range(n):
        pivot = col
        for row in range(col + 1, n):
            if abs(a[row, col]) > abs(a[pivot, col]):
                pivot = row
        if pivot != col:
            for k in range(n):
                a[col, k], a[pivot, k] = a[pivot, k], a[col, k]
            b[col], b[pivot] = b[pivot], b[col]
        for row in range(col + 1, n):
            factor = a[row, col] / a[col, col]
            for k in range(col, n):
                a[row, k] -= factor * a[col, k]
            b[row] -= factor * b[col]
    x = np.empty(n)
    for row in range(n - 1, -1, -1):
        total = b[row]
        for k in range(row + 1, n):
            total -= a[row, k] * x[k]
        x[row] = total / a[row, row]
    return x


def available() -> bool:
    """Whether the steps run compiled here."""
    return numba is not None


def warmed() -> bool:
    """Whether :func:`warm` has compiled or loaded the steps (never without numba)."""
    return _warm


_WARMING = threading.Lock()
_warm = False


def warm() -> None:
    """Compile the steps and the fit (or load them from numba's cache, beside this file or
    in the user's cache where that is read-only) before worker processes fork, so that each
    does not compile its own: for the argument types the comparison passes (pixel centres
    are read-only, ``samecapture._unit_grid``). Once; a second caller waits for the first."""
    global _warm
    with _WARMING:
        if _warm or numba is None:
            return
        t, stack = np.zeros(16, np.float32), np.zeros((3, 4, 4), np.float32)
        design = np.zeros((16, 3), np.float32)
        design.flags.writeable = False
        steps(t, stack, design, np.eye(2, 3), 1, 0.0)
        inside = np.ones(16, np.bool_)
        robust_fit(t, t.copy(), inside, 1, np.empty_like(t), np.empty_like(t))
        # The agreement's patch counts (patch axes are read-only, ``samecapture._patch_axes``)
        # and its chroma fit (chroma is read-only,
        # ``samecapture._chroma_of``).
        axes = np.zeros(4, np.int64)
        axes.flags.writeable = False
        mask = inside.reshape(4, 4)
        patch_counts(mask, axes, axes)
        chroma = np.zeros(16, np.complex128)
        chroma.flags.writeable = False
        chroma_fit(chroma, chroma, inside, 1, np.empty(16))
        # The geometric check's hypotheses: matched cell centres, drawn triples read-only
        # (``verify._seeded_picks``).
        points = np.zeros((4, 2))
        picks = np.zeros((1, 3), np.int64)
        picks.flags.writeable = False
        best_triple(points, points, picks, 1.0)
        # The captures' blur, on single-precision levels and double-precision chroma, with
        # the read-only Gaussian kernels of ``samecapture._gaussian``.
        weights = np.ones(3)
        weights.flags.writeable = False
        for dtype in (np.float32, np.float64):
            image = np.zeros((4, 4), dtype)
            blur(image, weights, np.empty_like(image))
            # Sampling, on the levels (single) and the alignment checks' maps (double).
            planes = np.zeros((3, 4, 4), dtype)
            sample(planes, np.zeros((2, 2), dtype), np.empty((3, 2), dtype))
            sample(planes[:1], np.zeros((2, 2), dtype), np.empty((1, 2), dtype))
        area(stack, np.empty((3, 2, 2), np.float32))
        _warm = True
