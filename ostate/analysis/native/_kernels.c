/*
 * ostate's compiled loops: the two passes over every coordinate that cost the most in
 * torch ops (docs/performance.md). Loaded with ctypes by ostate/analysis/native/kernels.py,
 * which also says what each function must compute; ostate falls back to the same
 * arithmetic in torch when this file was not compiled (no C compiler at install time).
 *
 * 1. ostate_sketch_f32: the counts, sums, extremes and bfloat16-bucket histogram of a
 *    run of float32 values (ostate.analysis.sketch.Sketch). One vectorised pass for the
 *    sums, extremes and zero counts, one scalar pass for the histogram; values holding
 *    NaN or infinity take a third, classifying pass.
 * 2. ostate_q8_blocks: the squared error of bitsandbytes' 8-bit blockwise round trip of
 *    consecutive blocks (ostate.analysis.quantize.BlockwiseError).
 *
 * Nothing here allocates, keeps state or touches Python objects, so it runs without the
 * GIL (ctypes releases it) and threads may call it at once on different outputs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks; only for the module below */

#include <stdint.h>
#include <string.h>
#include <math.h>

/* NaN and infinities are counted, so IEEE semantics are required: refuse to build under
 * -ffast-math or -ffinite-math-only (in CFLAGS) rather than miscount silently. */
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "ostate's compiled loops need IEEE NaN and infinity semantics: build without -ffast-math"
#endif

/* Bumped whenever a function's signature or meaning changes: ostate.analysis.native.kernels refuses
 * a library built from another version of this file (a stale in-place build). */
#define OSTATE_KERNELS_ABI 1

/* Two builds of the vectorised loops where GCC can pick one at load time (AVX2 or
 * baseline x86-64); a single portable build elsewhere. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define OSTATE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OSTATE_CLONES
#endif

#if defined(_WIN32)
#define OSTATE_EXPORT __declspec(dllexport)
#else
#define OSTATE_EXPORT __attribute__((visibility("default")))
#endif

/* Must match ostate.analysis.native.kernels._SketchSums field for field. */
typedef struct {
    double total;    /* sum of the finite values */
    double sumsq;    /* sum of their squares */
    double min;      /* smallest finite value (+inf when none) */
    double max;      /* largest finite value (-inf when none) */
    int64_t count;   /* finite values, zeros included */
    int64_t zeros;   /* exact zeros (+0.0 and -0.0), among count */
    int64_t nan;
    int64_t posinf;
    int64_t neginf;
} ostate_sketch_sums;

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef struct {
    double total, sumsq;
    float min, max;
    int64_t plus_zeros, minus_zeros;
} plain_sums;

/* Sums and extremes of v[0..n), in float64, in eight lanes of consecutive values (the
 * same order for the same n, so the same bits). Only meaningful when every value is
 * finite: the caller checks that the total is. */
OSTATE_CLONES
static void sums_of(const float *v, int64_t n, plain_sums *out) {
    v4d t0 = {0, 0, 0, 0}, t1 = {0, 0, 0, 0}, s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    v8f lo, hi;
    v8i zp = {0}, zn = {0};
    const v8i zero = {0};
    const v8i minus_zero = {INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN};
    for (int j = 0; j < 8; j++) {
        lo[j] = INFINITY;
        hi[j] = -INFINITY;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f x;
        v8i bits;
        memcpy(&x, v + i, sizeof x);
        memcpy(&bits, v + i, sizeof bits);
        v4f low = {x[0], x[1], x[2], x[3]}, high = {x[4], x[5], x[6], x[7]};
        v4d dl = __builtin_convertvector(low, v4d), dh = __builtin_convertvector(high, v4d);
        t0 += dl;
        t1 += dh;
        s0 += dl * dl;
        s1 += dh * dh;
        v8i below = x < lo, above = x > hi;
        lo = (v8f)(((v8i)x & below) | ((v8i)lo & ~below));
        hi = (v8f)(((v8i)x & above) | ((v8i)hi & ~above));
        zp -= (bits == zero);
        zn -= (bits == minus_zero);
    }
    double total = 0.0, sumsq = 0.0;
    float low = INFINITY, high = -INFINITY;
    int64_t plus_zeros = 0, minus_zeros = 0;
    for (int j = 0; j < 4; j++) {
        total += t0[j] + t1[j];
        sumsq += s0[j] + s1[j];
    }
    for (int j = 0; j < 8; j++) {
        low = lo[j] < low ? lo[j] : low;
        high = hi[j] > high ? hi[j] : high;
        plus_zeros += zp[j];
        minus_zeros += zn[j];
    }
    for (; i < n; i++) {
        float x = v[i];
        uint32_t bits;
        memcpy(&bits, v + i, sizeof bits);
        double d = x;
        total += d;
        sumsq += d * d;
        low = x < low ? x : low;
        high = x > high ? x : high;
        plus_zeros += bits == 0u;
        minus_zeros += bits == 0x80000000u;
    }
    out->total = total;
    out->sumsq = sumsq;
    out->min = low;
    out->max = high;
    out->plus_zeros = plus_zeros;
    out->minus_zeros = minus_zeros;
}

/* The slow path, for values holding NaN or infinity: classify one value at a time. */
static void add_with_nonfinite(const float *v, int64_t n, int64_t *hist, ostate_sketch_sums *acc) {
    double total = 0.0, sumsq = 0.0, low = INFINITY, high = -INFINITY;
    int64_t count = 0, zeros = 0;
    for (int64_t i = 0; i < n; i++) {
        float x = v[i];
        uint32_t bits;
        memcpy(&bits, v + i, sizeof bits);
        uint32_t magnitude = bits & 0x7FFFFFFFu;
        if (magnitude > 0x7F800000u) {
            acc->nan++;
            continue;
        }
        if (magnitude == 0x7F800000u) {
            if (bits >> 31)
                acc->neginf++;
            else
                acc->posinf++;
            continue;
        }
        count++;
        double d = x;
        total += d;
        sumsq += d * d;
        low = d < low ? d : low;
        high = d > high ? d : high;
        if (magnitude == 0)
            zeros++;
        else if (hist)
            hist[bits >> 16]++;
    }
    acc->total += total;
    acc->sumsq += sumsq;
    acc->count += count;
    acc->zeros += zeros;
    if (low < acc->min)
        acc->min = low;
    if (high > acc->max)
        acc->max = high;
}

/* Add v[0..n) to acc and, unless hist is NULL, count each finite non-zero value in
 * hist[top 16 bits of its pattern] (hist holds 65536 counts). Sums and extremes are in
 * float64, so no float32 value makes them overflow or underflow. */
OSTATE_EXPORT void ostate_sketch_f32(const float *v, int64_t n, int64_t *hist, ostate_sketch_sums *acc) {
    if (n <= 0)
        return;
    plain_sums s;
    sums_of(v, n, &s);
    if (!isfinite(s.total) || !isfinite(s.sumsq)) {
        add_with_nonfinite(v, n, hist, acc);
        return;
    }
    if (hist) {
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, v + i, sizeof bits);
            hist[bits >> 16]++;
        }
        hist[0] -= s.plus_zeros;
        hist[0x8000] -= s.minus_zeros;
    }
    acc->zeros += s.plus_zeros + s.minus_zeros;
    acc->total += s.total;
    acc->sumsq += s.sumsq;
    acc->count += n;
    if (s.min < acc->min)
        acc->min = s.min;
    if (s.max > acc->max)
        acc->max = s.max;
}

/* The same, without a histogram, for k rows of length n laid end to end: row r is
 * added to acc[r] exactly as its own call would add it (the same bits). */
OSTATE_EXPORT void ostate_sketch_rows_f32(const float *v, int64_t k, int64_t n, ostate_sketch_sums *acc) {
    for (int64_t r = 0; r < k; r++)
        ostate_sketch_f32(v + r * n, n, NULL, acc + r);
}

/* Largest block ostate_q8_blocks takes (bitsandbytes' block; tiny tensors are shorter). */
#define Q8_MAX_BLOCK 256

/* max |x| (signed) or max x over one block, NaN if the block holds one. */
OSTATE_CLONES
static float block_absmax(const float *x, int64_t n, int is_signed) {
    const v8i magnitude_bits = {0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF,
                                0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF, 0x7FFFFFFF};
    const v8i all_bits = {-1, -1, -1, -1, -1, -1, -1, -1};
    const v8i mask = is_signed ? magnitude_bits : all_bits;
    v8f best;
    v8i nan = {0};
    for (int j = 0; j < 8; j++)
        best[j] = -INFINITY;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f a;
        memcpy(&a, x + i, sizeof a);
        a = (v8f)((v8i)a & mask);
        nan |= a != a;
        v8i above = a > best;
        best = (v8f)(((v8i)a & above) | ((v8i)best & ~above));
    }
    float out = -INFINITY;
    int saw_nan = 0;
    for (int j = 0; j < 8; j++) {
        out = best[j] > out ? best[j] : out;
        saw_nan |= nan[j] != 0;
    }
    for (; i < n; i++) {
        float a = is_signed ? fabsf(x[i]) : x[i];
        saw_nan |= a != a;
        out = a > out ? a : out;
    }
    return saw_nan ? NAN : out;
}

/* Sum of n float32 values in float64, in eight lanes. */
OSTATE_CLONES
static double lane_sum(const float *v, int64_t n) {
    v4d t0 = {0, 0, 0, 0}, t1 = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f x;
        memcpy(&x, v + i, sizeof x);
        v4f low = {x[0], x[1], x[2], x[3]}, high = {x[4], x[5], x[6], x[7]};
        t0 += __builtin_convertvector(low, v4d);
        t1 += __builtin_convertvector(high, v4d);
    }
    double total = 0.0;
    for (int j = 0; j < 4; j++)
        total += t0[j] + t1[j];
    for (; i < n; i++)
        total += v[i];
    return total;
}

/* One block: y = x / scale, its squares, and each y's squared distance to the nearer of
 * its bucket's two candidate codes (float32, as bitsandbytes computes y). */
OSTATE_CLONES
static void block_terms(const float *x, int64_t n, float scale, const float *lo, const float *hi, float *squares,
                        float *errors) {
    float y[Q8_MAX_BLOCK];
    for (int64_t i = 0; i < n; i++) {
        y[i] = x[i] / scale;
        squares[i] = y[i] * y[i];
    }
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, y + i, sizeof bits);
        uint32_t id = bits >> 16;
        float dl = y[i] - lo[id], dh = y[i] - hi[id];
        float el = dl * dl, eh = dh * dh;
        errors[i] = el < eh ? el : eh; /* both NaN or neither: y is NaN only when the block holds NaN or inf */
    }
}

/* The 8-bit blockwise round trip of `blocks` consecutive blocks of `length` values
 * (at most Q8_MAX_BLOCK): per block b with a_b = max |x| (signed) or max x (unsigned;
 * NaN if the block holds one), y = x / a_b in float32 (a_b = 0 counts as 1), and the
 * nearest code is the nearer of lo[id] and hi[id] with id the top 16 bits of y's
 * pattern. Writes per block a_b^2 * sum (y - code)^2 to err[b] and a_b^2 * sum y^2 to
 * norm[b] (float64), or, when err is NULL, adds their sums over all blocks to
 * totals[0] and totals[1]. Returns -1 (and does nothing) if length is too long. */
OSTATE_EXPORT int ostate_q8_blocks(const float *x, int64_t blocks, int64_t length, int is_signed, const float *lo,
                                   const float *hi, double *err, double *norm, double *totals) {
    if (length > Q8_MAX_BLOCK || length < 0)
        return -1;
    float squares[Q8_MAX_BLOCK], errors[Q8_MAX_BLOCK];
    double err_total = 0.0, norm_total = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        const float *block = x + b * length;
        float absmax = block_absmax(block, length, is_signed);
        block_terms(block, length, absmax == 0.0f ? 1.0f : absmax, lo, hi, squares, errors);
        double a2 = (double)absmax * (double)absmax;
        double e = lane_sum(errors, length) * a2, s = lane_sum(squares, length) * a2;
        if (err) {
            err[b] = e;
            norm[b] = s;
        } else {
            err_total += e;
            norm_total += s;
        }
    }
    if (!err) {
        totals[0] += err_total;
        totals[1] += norm_total;
    }
    return 0;
}

/* How many of v[0..n) are <= threshold (NaN is not). */
OSTATE_CLONES
OSTATE_EXPORT int64_t ostate_count_at_most(const float *v, int64_t n, float threshold) {
    v8i hits = {0};
    v8f limit;
    for (int j = 0; j < 8; j++)
        limit[j] = threshold;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f x;
        memcpy(&x, v + i, sizeof x);
        hits -= x <= limit;
    }
    int64_t count = 0;
    for (int j = 0; j < 8; j++)
        count += hits[j];
    for (; i < n; i++)
        count += v[i] <= threshold;
    return count;
}

/* For one row: sums of n2 = (n * n_scale)^2, w = n2 * d and w * d with d = inv - ref,
 * each term in float32, the sums in float64 (eight lanes). */
OSTATE_CLONES
static void weighted_row(const float *n, const float *inv, int64_t length, float n_scale, float ref, double out[3]) {
    v4d a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0}, b0 = {0, 0, 0, 0}, b1 = {0, 0, 0, 0}, c0 = {0, 0, 0, 0},
        c1 = {0, 0, 0, 0};
    v8f scale, reference;
    for (int j = 0; j < 8; j++) {
        scale[j] = n_scale;
        reference[j] = ref;
    }
    int64_t i = 0;
    for (; i + 8 <= length; i += 8) {
        v8f x, y;
        memcpy(&x, n + i, sizeof x);
        memcpy(&y, inv + i, sizeof y);
        x *= scale;
        v8f n2 = x * x, d = y - reference;
        v8f w = n2 * d, w2 = w * d;
        a0 += __builtin_convertvector((v4f){n2[0], n2[1], n2[2], n2[3]}, v4d);
        a1 += __builtin_convertvector((v4f){n2[4], n2[5], n2[6], n2[7]}, v4d);
        b0 += __builtin_convertvector((v4f){w[0], w[1], w[2], w[3]}, v4d);
        b1 += __builtin_convertvector((v4f){w[4], w[5], w[6], w[7]}, v4d);
        c0 += __builtin_convertvector((v4f){w2[0], w2[1], w2[2], w2[3]}, v4d);
        c1 += __builtin_convertvector((v4f){w2[4], w2[5], w2[6], w2[7]}, v4d);
    }
    double squares = 0.0, first = 0.0, second = 0.0;
    for (int j = 0; j < 4; j++) {
        squares += a0[j] + a1[j];
        first += b0[j] + b1[j];
        second += c0[j] + c1[j];
    }
    for (; i < length; i++) {
        float x = n[i] * n_scale;
        float n2 = x * x, d = inv[i] - ref;
        float w = n2 * d;
        squares += n2;
        first += w;
        second += w * d;
    }
    out[0] = squares;
    out[1] = first;
    out[2] = second;
}

/* Adam-mini's per-row sums (ostate.analysis.compress.SharedSecondMoment) of `rows` rows of
 * `length` values: s the second moment (s_hat = s * s_scale), n the numerator scaled by
 * n_scales[r], inv the inverse denominator (a = inv * i_scale). Adds to each row r:
 * moment[r] += sum s_hat; if reference[r] is NaN it becomes 1 / (sqrt(max(mean s_hat, 0)) + eps)
 * (NaN stays NaN); squares[r] += sum n2; first[r] += sum n2 (a - ref) and
 * second[r] += sum n2 (a - ref)^2, with a - ref = i_scale * (inv - (float)(ref / i_scale)). */
OSTATE_EXPORT void ostate_shared_rows(const float *s, const float *n, const float *inv, int64_t rows, int64_t length,
                                      double s_scale, double eps, const float *n_scales, double i_scale,
                                      double *reference, double *moment, double *squares, double *first,
                                      double *second) {
    for (int64_t r = 0; r < rows; r++) {
        double moment_sum = lane_sum(s + r * length, length) * s_scale;
        moment[r] += moment_sum;
        if (isnan(reference[r])) {
            double mean = moment_sum / (double)length;
            if (!(mean > 0.0) && !isnan(mean))
                mean = 0.0;
            reference[r] = 1.0 / (sqrt(mean) + eps);
        }
        double sums[3];
        weighted_row(n + r * length, inv + r * length, length, n_scales[r], (float)(reference[r] / i_scale), sums);
        squares[r] += sums[0];
        first[r] += sums[1] * i_scale;
        second[r] += sums[2] * (i_scale * i_scale);
    }
}

/* The version of these functions' signatures and meanings (OSTATE_KERNELS_ABI). */
OSTATE_EXPORT int ostate_kernels_abi(void) { return OSTATE_KERNELS_ABI; }

/* A module Python can import, so setuptools builds and installs this file like any
 * extension; its functions are reached through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "ostate's compiled loops (used via ctypes).", -1,
                                    NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
