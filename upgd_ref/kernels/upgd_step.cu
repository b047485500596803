// CUDA kernels of one fused VGS + AdaptiveUPGD step on flat buffers (specs/kernels-cuda.md).
//
// The one CUDA source of upgd_ref. upgd_ref/kernels/cuda_source.py prepends a prelude of
// constants (chunk table and coefficient columns, Philox and fdlibm constants, the tanh
// series as straight-line Horner code), all generated from the Python definitions, so the
// numbers exist once. The same text compiles two ways:
//   * NVRTC (__CUDACC__ defined): the GPU kernels, always with --fmad=false, so that every
//     a * b + c is two IEEE roundings as on the CPU;
//   * a host C++ compiler (cuda_emulator.py): each kernel becomes a loop over its blocks and
//     threads, the reductions combine in the same fixed order, so the emulator computes
//     what the GPU computes, bit for bit, wherever libm is not involved (only the exp of the
//     paper's "max" protection).
//
// Work items are the chunks of the chunk table (CHUNK elements of one segment). A block of
// UPGD_THREADS threads handles one chunk at a time (grid-stride over chunks); thread tid
// takes elements tid, tid + UPGD_THREADS, ... (pass 1) or Philox blocks first + tid, ... (pass
// 2). Each chunk's partial results depend only on the chunk, never on the grid size.

#ifdef __CUDACC__
#define UPGD_DEVICE __device__ __forceinline__
#define UPGD_KERNEL extern "C" __global__ void __launch_bounds__(UPGD_THREADS)
#else
#include <cmath>
#include <cstring>
#define UPGD_DEVICE static inline
#define UPGD_KERNEL extern "C" void
#endif

typedef long long i64;
typedef unsigned int u32;
typedef unsigned long long u64;

#define UPGD_WARP 32
#define UPGD_WARPS (UPGD_THREADS / UPGD_WARP)

// --- portable primitives -------------------------------------------------------------

UPGD_DEVICE u64 bits_of(double x) {
#ifdef __CUDACC__
    return (u64)__double_as_longlong(x);
#else
    u64 bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
#endif
}

UPGD_DEVICE u32 float_bits(float x) {
#ifdef __CUDACC__
    return __float_as_uint(x);
#else
    u32 bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
#endif
}

UPGD_DEVICE float float_from_bits(u32 bits) {
#ifdef __CUDACC__
    return __uint_as_float(bits);
#else
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
#endif
}

UPGD_DEVICE double double_from_bits(u64 bits) {
#ifdef __CUDACC__
    return __longlong_as_double((long long)bits);
#else
    double x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
#endif
}

#ifdef __CUDACC__
UPGD_DEVICE float sqrt_of(float x) { return sqrtf(x); }    // IEEE (NVRTC's default -prec-sqrt=true)
UPGD_DEVICE double sqrt_of(double x) { return sqrt(x); }
UPGD_DEVICE float exp_of(float x) { return expf(x); }      // CUDA's exp, not libm's: within the contract
UPGD_DEVICE double exp_of(double x) { return exp(x); }
UPGD_DEVICE bool is_finite_value(float x) { return isfinite(x); }
UPGD_DEVICE bool is_finite_value(double x) { return isfinite(x); }
UPGD_DEVICE float abs_of(float x) { return fabsf(x); }
UPGD_DEVICE double abs_of(double x) { return fabs(x); }
#else
UPGD_DEVICE float sqrt_of(float x) { return std::sqrt(x); }
UPGD_DEVICE double sqrt_of(double x) { return std::sqrt(x); }
UPGD_DEVICE float exp_of(float x) { return std::exp(x); }
UPGD_DEVICE double exp_of(double x) { return std::exp(x); }
UPGD_DEVICE bool is_finite_value(float x) { return std::isfinite(x); }
UPGD_DEVICE bool is_finite_value(double x) { return std::isfinite(x); }
UPGD_DEVICE float abs_of(float x) { return std::fabs(x); }
UPGD_DEVICE double abs_of(double x) { return std::fabs(x); }
#endif

// --- noise: specs/noise.md term for term ----------------------------------------------

UPGD_DEVICE void philox4x32_10(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
        if (round) {
            k0 += PHILOX_W0;  // mod 2**32
            k1 += PHILOX_W1;
        }
        u64 product0 = (u64)c[0] * PHILOX_M0;
        u64 product1 = (u64)c[2] * PHILOX_M1;
        u32 hi0 = (u32)(product0 >> 32), lo0 = (u32)product0;
        u32 hi1 = (u32)(product1 >> 32), lo1 = (u32)product1;
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

// ln u for u = (word + 0.5) 2**-32: fdlibm's log kernel; (k, t) with word + 0.5 = t 2**(k + 32),
// t in [SQRT_HALF, SQRT2), read from the IEEE-754 fields (exact).
UPGD_DEVICE double log_of_uniform(u32 word) {
    u64 bits = bits_of((double)word + 0.5);
    i64 exponent = (i64)(bits >> 52) - 1023;
    double t = double_from_bits((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    int upper = t >= SQRT2;
    t = upper ? t * 0.5 : t;
    double k = (double)(exponent + upper - 32);
    double f = t - 1.0;
    double s = f / (2.0 + f);
    double z = s * s;
    double w = z * z;
    double t1 = w * (LG2 + w * (LG4 + w * LG6));
    double t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    double r = t2 + t1;
    double hfsq = 0.5 * f * f;
    return k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f);
}

UPGD_DEVICE double kernel_sin(double x) {
    double z = x * x;
    double v = z * x;
    double r = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)));
    return x + v * (S1 + z * r);
}

UPGD_DEVICE double kernel_cos(double x) {
    double z = x * x;
    double r = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    return 1.0 - (0.5 * z - z * r);
}

// cos and sin of 2 pi u: octant from the top 3 bits, odd octants reflected.
UPGD_DEVICE void cos_sin_of_turn(u32 word, double* cos_out, double* sin_out) {
    u32 octant = word >> OCTANT_FRACTION_BITS;
    u32 mask = (1u << OCTANT_FRACTION_BITS) - 1u;
    u32 low = word & mask;
    u32 reduced = (octant & 1u) ? mask - low : low;
    double a = (((double)reduced + 0.5) * OCTANT_FRACTION_SCALE) * PI_OVER_4;
    double s = kernel_sin(a);
    double c = kernel_cos(a);
    bool swap = ((octant + 1u) >> 1) & 1u;          // octants 1, 2, 5, 6
    bool cos_negative = ((octant + 2u) >> 2) & 1u;  // octants 2..5
    bool sin_negative = (octant >> 2) == 1u;        // octants 4..7
    double cos_magnitude = swap ? s : c;
    double sin_magnitude = swap ? c : s;
    *cos_out = cos_negative ? -cos_magnitude : cos_magnitude;
    *sin_out = sin_negative ? -sin_magnitude : sin_magnitude;
}

// --- noise format 2: specs/noise-v2.md term for term (binary32; upgd_ref/rng_v2.py) ------

// ln u in binary32: the complement of a word with its top bit set gives v = 1 - u, ln(1 - v);
// otherwise (k, t) with u = t 2**k, t in [V2_SQRT_HALF, V2_SQRT2), from the binary32 fields.
UPGD_DEVICE float log_of_uniform_v2(u32 word) {
    bool high = word >= 0x80000000u;
    u32 h = high ? ~word : word;  // below 2**31
    float x = (float)(int)h + 0.5f;
    u32 bits = float_bits(x);
    float biased_exponent = (float)(int)(bits >> 23);
    float t = float_from_bits((bits & 0x007FFFFFu) | 0x3F800000u);
    bool upper = t >= V2_SQRT2;
    t = upper ? t * 0.5f : t;
    float k_low = biased_exponent - 159.0f;  // 127 + 32
    k_low = upper ? k_low + 1.0f : k_low;
    float v = x * 0x1p-32f;
    bool near_one = v < V2_ONE_MINUS_SQRT_HALF;
    float f_high = near_one ? -v : 1.0f - 2.0f * v;
    float k_high = near_one ? 0.0f : -1.0f;
    float f = high ? f_high : t - 1.0f;
    float k = high ? k_high : k_low;
    float s = f / (2.0f + f);
    float z = s * s;
    float w = z * z;
    float t1 = w * (V2_LG2 + w * V2_LG4);
    float t2 = z * (V2_LG1 + w * V2_LG3);
    float r = t2 + t1;
    float hfsq = 0.5f * f * f;
    return k * V2_LN2_HI - ((hfsq - (s * (hfsq + r) + k * V2_LN2_LO)) - f);
}

UPGD_DEVICE void cos_sin_of_turn_v2(u32 word, float* cos_out, float* sin_out) {
    u32 octant = word >> OCTANT_FRACTION_BITS;
    u32 mask = (1u << OCTANT_FRACTION_BITS) - 1u;
    u32 low = word & mask;
    u32 reduced = (octant & 1u) ? mask - low : low;
    float a = (float)(int)(2u * reduced + 1u) * V2_ANGLE_SCALE;
    float z = a * a;
    float s = a + (((V2_S3 * z + V2_S2) * z + V2_S1) * z) * a;
    float c = ((((V2_C3 * z + V2_C2) * z + V2_C1) * z) * z - 0.5f * z) + 1.0f;
    bool swap = ((octant + 1u) >> 1) & 1u;          // octants 1, 2, 5, 6
    bool cos_negative = ((octant + 2u) >> 2) & 1u;  // octants 2..5
    bool sin_negative = (octant >> 2) == 1u;        // octants 4..7
    float cos_magnitude = swap ? s : c;
    float sin_magnitude = swap ? c : s;
    *cos_out = cos_negative ? -cos_magnitude : cos_magnitude;
    *sin_out = sin_negative ? -sin_magnitude : sin_magnitude;
}

// The four normals of Philox block `block` (logical indices 4 block .. 4 block + 3) in noise
// format `version` (1: float64; 2: binary32, held exactly in the doubles).
UPGD_DEVICE void block_normals(u64 block, u32 step_lo, u32 step_hi, u32 key0, u32 key1, int version,
                               double normal[4]) {
    u32 c[4] = {(u32)block, (u32)(block >> 32), step_lo, step_hi};
    philox4x32_10(c, key0, key1);
    if (version == 2) {
        for (int pair = 0; pair < 2; ++pair) {
            float radius = sqrt_of(-2.0f * log_of_uniform_v2(c[2 * pair]));
            float cos_value, sin_value;
            cos_sin_of_turn_v2(c[2 * pair + 1], &cos_value, &sin_value);
            normal[2 * pair] = (double)(radius * cos_value);
            normal[2 * pair + 1] = (double)(radius * sin_value);
        }
        return;
    }
    for (int pair = 0; pair < 2; ++pair) {
        double radius = sqrt_of(-2.0 * log_of_uniform(c[2 * pair]));
        double cos_value, sin_value;
        cos_sin_of_turn(c[2 * pair + 1], &cos_value, &sin_value);
        normal[2 * pair] = radius * cos_value;
        normal[2 * pair + 1] = radius * sin_value;
    }
}

// --- element-wise math (specs/kernels.md §3; the Numba kernels' expressions) -----------

// tanh(w) for |w| <= 1/2, float and double (generated: the series' coefficients).
// @tanh-functions

template <typename T>
UPGD_DEVICE T ema(T beta, T old, T one_minus_beta, T term) { return beta * old + one_minus_beta * term; }

// su = sigmoid(2 (x - 1/2)) = (1 + tanh(x - 1/2)) / 2 for x in [0, 1].
template <typename T>
UPGD_DEVICE T protection(T x) {
    const T half = (T)0.5;
    return half + half * tanh_half_unit(x - half);
}

template <typename T>
UPGD_DEVICE T clip_unit(T x) {
    return x < (T)0 ? (T)0 : (x > (T)1 ? (T)1 : x);
}

// d = m_hat / (sqrt(v_hat) + eps), m_hat = m / bc1 and v_hat = v / bc2 as reciprocal products:
// one expression for pass 1's bound and pass 2's update.
template <typename T>
UPGD_DEVICE T direction(T m, T v, T inv_bc1, T inv_bc2, T eps) {
    return (m * inv_bc1) / (sqrt_of(v * inv_bc2) + eps);
}

// 0 for a finite x, NaN for an infinite or NaN one (x * 0, IEEE-754).
template <typename T>
UPGD_DEVICE T nonfinite_marker(T x) { return x * (T)0; }

// p (1 - lr wd) - lr (m_hat / (sqrt(v_hat) + eps) + noise) (1 - su), divisions by per-segment
// scalars as products with dtype-rounded reciprocals.
template <typename T>
UPGD_DEVICE T updated_param(T p, T u, T m, T v, T noise, T decay, T lr, T eps, T inv_cu, T inv_bc1,
                            T inv_bc2, T u_lo, T inv_range) {
    T d = direction(m, v, inv_bc1, inv_bc2, eps);
    T x = clip_unit((u * inv_cu - u_lo) * inv_range);
    return p * decay - lr * (d + noise) * ((T)1 - protection(x));
}

// The paper's su = 1 / (1 + exp(-((u/cu) / U_hi))): a true division by U_hi whatever its sign.
template <typename T>
UPGD_DEVICE T max_protection(T u, T inv_cu, T u_hi) {
    return (T)1 / ((T)1 + exp_of(-((u * inv_cu) / u_hi)));
}

// Any member of the family (specs/algorithm.md §7), step = update_factor lr.
template <typename T>
UPGD_DEVICE T family_param(T p, T g, T u, T m, T v, T noise, T decay, T step, T eps, T inv_cu, T inv_bc1,
                           T inv_bc2, T u_lo, T inv_range, T u_hi, int mode) {
    T su = (mode & PROTECTION_MAX) ? max_protection(u, inv_cu, u_hi)
                                   : protection(clip_unit((u * inv_cu - u_lo) * inv_range));
    T keep = (T)1 - su;
    if (mode & MOMENTS_NONE) {
        T bracket = (mode & NOISE_TERMS) ? g * keep + noise * keep : (g + noise) * keep;
        return p * decay - step * bracket;
    }
    if (mode & NOISE_TERMS) return p * decay - step * ((m * inv_bc1) * keep / (sqrt_of(v * inv_bc2) + eps) + noise * keep);
    return p * decay - step * (direction(m, v, inv_bc1, inv_bc2, eps) + noise) * keep;
}

// --- partial results and their fixed-order combination ---------------------------------

// sum x, sum x^2 (or a count in `sum`), min u, max u, max |p|, max |d|, count of non-finite
// elements (specs/kernels-cuda.md §2; the columns of chunk_abi's partial table, in order).
struct Partial {
    double sum, sum_sq, lo, hi, max_p, max_d, bad;
};

UPGD_DEVICE Partial empty_partial() {
    Partial q;
    q.sum = 0.0;
    q.sum_sq = 0.0;
    q.lo = double_from_bits(0x7FF0000000000000ull);  // +inf
    q.hi = -q.lo;
    q.max_p = 0.0;
    q.max_d = 0.0;
    q.bad = 0.0;
    return q;
}

UPGD_DEVICE Partial combine(Partial a, Partial b) {
    Partial q;
    q.sum = a.sum + b.sum;
    q.sum_sq = a.sum_sq + b.sum_sq;
    q.lo = b.lo < a.lo ? b.lo : a.lo;
    q.hi = b.hi > a.hi ? b.hi : a.hi;
    q.max_p = b.max_p > a.max_p ? b.max_p : a.max_p;
    q.max_d = b.max_d > a.max_d ? b.max_d : a.max_d;
    q.bad = a.bad + b.bad;
    return q;
}

UPGD_DEVICE void store(double* out, i64 item, Partial q) {
    out[NUM_PARTIALS * item + SUM] = q.sum;
    out[NUM_PARTIALS * item + SUM_SQ] = q.sum_sq;
    out[NUM_PARTIALS * item + MIN_U] = q.lo;
    out[NUM_PARTIALS * item + MAX_U] = q.hi;
    out[NUM_PARTIALS * item + MAX_P] = q.max_p;
    out[NUM_PARTIALS * item + MAX_D] = q.max_d;
    out[NUM_PARTIALS * item + BAD] = q.bad;
}

#ifdef __CUDACC__
UPGD_DEVICE Partial shuffle_down(Partial q, int offset) {
    q.sum = __shfl_down_sync(0xFFFFFFFFu, q.sum, offset);
    q.sum_sq = __shfl_down_sync(0xFFFFFFFFu, q.sum_sq, offset);
    q.lo = __shfl_down_sync(0xFFFFFFFFu, q.lo, offset);
    q.hi = __shfl_down_sync(0xFFFFFFFFu, q.hi, offset);
    q.max_p = __shfl_down_sync(0xFFFFFFFFu, q.max_p, offset);
    q.max_d = __shfl_down_sync(0xFFFFFFFFu, q.max_d, offset);
    q.bad = __shfl_down_sync(0xFFFFFFFFu, q.bad, offset);
    return q;
}
#endif

// For each item (a chunk, or a segment) out[item] = the combination of body(item, tid) over
// the block's threads, in this order: within each warp of 32 threads, offsets 16, 8, 4, 2, 1
// (value[l] = value[l] + value[l + offset] for l < offset); then over the warps' results,
// offsets UPGD_WARPS / 2, ..., 1 the same way.
template <class Body>
UPGD_DEVICE void reduce_items(i64 count, double* out, Body body) {
#ifdef __CUDACC__
    __shared__ Partial heads[UPGD_WARPS];
    const int tid = threadIdx.x, lane = tid % UPGD_WARP, warp = tid / UPGD_WARP;
    for (i64 item = blockIdx.x; item < count; item += gridDim.x) {
        Partial q = body(item, tid);
        for (int offset = UPGD_WARP / 2; offset > 0; offset /= 2) q = combine(q, shuffle_down(q, offset));
        if (lane == 0) heads[warp] = q;
        __syncthreads();
        if (warp == 0) {
            q = lane < UPGD_WARPS ? heads[lane] : empty_partial();
            for (int offset = UPGD_WARPS / 2; offset > 0; offset /= 2) q = combine(q, shuffle_down(q, offset));
            if (lane == 0) store(out, item, q);
        }
        __syncthreads();
    }
#else
    static thread_local Partial value[UPGD_THREADS];
    for (i64 item = 0; item < count; ++item) {
        for (int tid = 0; tid < UPGD_THREADS; ++tid) value[tid] = body(item, tid);
        for (int warp = 0; warp < UPGD_WARPS; ++warp) {
            Partial* w = value + warp * UPGD_WARP;
            for (int offset = UPGD_WARP / 2; offset > 0; offset /= 2)
                for (int lane = 0; lane < offset; ++lane) w[lane] = combine(w[lane], w[lane + offset]);
        }
        for (int offset = UPGD_WARPS / 2; offset > 0; offset /= 2)
            for (int head = 0; head < offset; ++head)
                value[head * UPGD_WARP] = combine(value[head * UPGD_WARP], value[(head + offset) * UPGD_WARP]);
        store(out, item, value[0]);
    }
#endif
}

// body(item, tid) for every item and thread (no result).
template <class Body>
UPGD_DEVICE void for_each_item(i64 count, Body body) {
#ifdef __CUDACC__
    for (i64 item = blockIdx.x; item < count; item += gridDim.x) body(item, (int)threadIdx.x);
#else
    for (i64 item = 0; item < count; ++item)
        for (int tid = 0; tid < UPGD_THREADS; ++tid) body(item, tid);
#endif
}

// --- kernel bodies ------------------------------------------------------------------------

struct Chunk {
    i64 segment, start, length, logical;
};

UPGD_DEVICE Chunk chunk_at(const i64* chunks, i64 c) {
    Chunk k;
    k.segment = chunks[4 * c + SEGMENT];
    k.start = chunks[4 * c + START];
    k.length = chunks[4 * c + LENGTH];
    k.logical = chunks[4 * c + LOGICAL];
    return k;
}

// For each chunk of a present segment: thread tid folds the chunk's elements tid, tid + 256,
// ... (flat indices j) into its Partial by accumulate(q, j), where accumulate = for_chunk(chunk)
// (per-chunk values such as coefficients are read once, into registers); then the fixed tree.
template <class ForChunk>
UPGD_DEVICE void reduce_present_chunks(const i64* chunks, const unsigned char* present, i64 num_chunks,
                                       double* partial, ForChunk for_chunk) {
    reduce_items(num_chunks, partial, [&](i64 c, int tid) {
        Partial q = empty_partial();
        Chunk k = chunk_at(chunks, c);
        if (present[k.segment]) {
            auto accumulate = for_chunk(k);
            for (i64 j = k.start + tid; j < k.start + k.length; j += UPGD_THREADS) accumulate(q, j);
        }
        return q;
    });
}

UPGD_DEVICE void add_sums(Partial& q, double w) {
    q.sum += w;
    q.sum_sq += w * w;
}

// Per chunk of a present segment: count of non-finite elements of x (in `sum`).
template <typename T>
UPGD_DEVICE void nonfinite_kernel(const T* x, const i64* chunks, const unsigned char* present, i64 num_chunks,
                                  double* partial) {
    reduce_present_chunks(chunks, present, num_chunks, partial, [&](const Chunk&) {
        return [&](Partial& q, i64 j) { q.sum += is_finite_value(x[j]) ? 0.0 : 1.0; };
    });
}

// g <- factor g on present segments.
template <typename T>
UPGD_DEVICE void scale_kernel(T* g, const i64* chunks, const unsigned char* present, i64 num_chunks, T factor) {
    for_each_item(num_chunks, [&](i64 c, int tid) {
        Chunk k = chunk_at(chunks, c);
        if (!present[k.segment]) return;
        for (i64 j = tid; j < k.length; j += UPGD_THREADS) g[k.start + j] = g[k.start + j] * factor;
    });
}

// Per chunk of a present segment: sum g, sum g^2 (float64).
template <typename T>
UPGD_DEVICE void moments_kernel(const T* g, const i64* chunks, const unsigned char* present, i64 num_chunks,
                                double* partial) {
    reduce_present_chunks(chunks, present, num_chunks, partial, [&](const Chunk&) {
        return [&](Partial& q, i64 j) { add_sums(q, (double)g[j]); };
    });
}

// The traces of one element: u (and m, v with moments) updated from the scaled gradient gj.
template <typename T>
struct Traces {
    T beta_u, one_minus_beta_u, beta1, one_minus_beta1, beta2, one_minus_beta2;
};

template <typename T>
UPGD_DEVICE T new_utility(const Traces<T>& c, T gj, T pj, T uj) { return ema(c.beta_u, uj, c.one_minus_beta_u, -gj * pj); }

template <typename T>
UPGD_DEVICE T new_first(const Traces<T>& c, T gj, T mj) { return ema(c.beta1, mj, c.one_minus_beta1, gj); }

template <typename T>
UPGD_DEVICE T new_second(const Traces<T>& c, T gj, T vj) { return ema(c.beta2, vj, c.one_minus_beta2, gj * gj); }

template <typename T>
UPGD_DEVICE Traces<T> traces_of(const T* b) {
    Traces<T> t = {b[BETA_U], b[ONE_MINUS_BETA_U], b[BETA1], b[ONE_MINUS_BETA1], b[BETA2], b[ONE_MINUS_BETA2]};
    return t;
}

// Pass 1, read-only: the new u (and m, v) of f g in registers, partial sums of f g, extrema of
// the new u, max |p|, max |d| (d = m_hat / (sqrt(v_hat) + eps), or f g without moments) and the
// count of elements where g, p, the new u, m, v or d is not finite (specs/algorithm.md §8).
template <typename T>
UPGD_DEVICE void pass1_kernel(const T* g, const T* p, const T* u, const T* m, const T* v, const i64* chunks,
                              const unsigned char* present, const T* coefficients, i64 num_chunks, T factor,
                              int moments, double* partial) {
    reduce_present_chunks(chunks, present, num_chunks, partial, [&](const Chunk& k) {
        const T* b = coefficients + NUM_COEFFICIENTS * k.segment;
        const Traces<T> tr = traces_of(b);
        const T eps = b[EPS], inv_bc1 = b[INV_BC1], inv_bc2 = b[INV_BC2];
        return [=](Partial& q, i64 j) {
            T gj = g[j] * factor;
            T pj = p[j];
            T uj = new_utility(tr, gj, pj, u[j]);
            T d = gj;
            T markers = nonfinite_marker(pj) + nonfinite_marker(uj);
            if (moments) {
                T mj = new_first(tr, gj, m[j]);
                T vj = new_second(tr, gj, v[j]);
                d = direction(mj, vj, inv_bc1, inv_bc2, eps);
                markers = (nonfinite_marker(gj) + markers) + (nonfinite_marker(mj) + nonfinite_marker(vj));
            }
            add_sums(q, (double)gj);
            double uw = (double)uj;
            q.lo = uw < q.lo ? uw : q.lo;
            q.hi = uw > q.hi ? uw : q.hi;
            double pw = (double)abs_of(pj);
            q.max_p = pw > q.max_p ? pw : q.max_p;
            T dm = abs_of(d) + markers;
            double dw = (double)dm;
            q.max_d = dw > q.max_d ? dw : q.max_d;
            q.bad += is_finite_value(dm) ? 0.0 : 1.0;
        };
    });
}

// Per segment: its chunks' partials (rows segment_chunks[s] .. segment_chunks[s + 1]), thread
// tid adding rows tid, tid + UPGD_THREADS, ... in order, then the block's fixed tree.
UPGD_DEVICE void segment_reduce_kernel(const double* partial, const i64* segment_chunks,
                                       const unsigned char* present, i64 num_segments, double* out) {
    reduce_items(num_segments, out, [&](i64 s, int tid) {
        Partial q = empty_partial();
        if (!present[s]) return q;
        for (i64 c = segment_chunks[s] + tid; c < segment_chunks[s + 1]; c += UPGD_THREADS) {
            Partial row;
            row.sum = partial[NUM_PARTIALS * c + SUM];
            row.sum_sq = partial[NUM_PARTIALS * c + SUM_SQ];
            row.lo = partial[NUM_PARTIALS * c + MIN_U];
            row.hi = partial[NUM_PARTIALS * c + MAX_U];
            row.max_p = partial[NUM_PARTIALS * c + MAX_P];
            row.max_d = partial[NUM_PARTIALS * c + MAX_D];
            row.bad = partial[NUM_PARTIALS * c + BAD];
            q = combine(q, row);
        }
        return q;
    });
}

// Calls apply(j, normal) for every element j of chunk k, with normal the element's float64
// normal (or 0 when `draw` is false); thread tid takes Philox blocks first + tid, ...
template <class Apply>
UPGD_DEVICE void chunk_blocks(Chunk k, int tid, bool draw, u32 step_lo, u32 step_hi, u32 key0, u32 key1,
                              int version, Apply apply) {
    const u64 first = (u64)k.logical / 4, last = (u64)(k.logical + k.length - 1) / 4;
    for (u64 block = first + tid; block <= last; block += UPGD_THREADS) {
        double normal[4] = {0.0, 0.0, 0.0, 0.0};
        if (draw) block_normals(block, step_lo, step_hi, key0, key1, version, normal);
        for (int lane = 0; lane < 4; ++lane) {
            i64 logical = (i64)(4 * block) + lane;
            if (logical < k.logical || logical >= k.logical + k.length) continue;
            apply(k.start + (logical - k.logical), normal[lane]);
        }
    }
}

// A segment's pass-2 coefficients, read once per chunk (into registers).
template <typename T>
struct PassTwo {
    Traces<T> traces;
    T decay, lr, eps, inv_cu, inv_bc1, inv_bc2;
};

// For each chunk of a present segment: update(j, noise, c) for each of its elements j, with c the
// segment's pass-2 coefficients and noise = std normal, or 0 without drawing when std == 0.
template <typename T, class Update>
UPGD_DEVICE void update_present_chunks(const i64* chunks, const unsigned char* present, const T* coefficients,
                                       i64 num_chunks, u32 step_lo, u32 step_hi, u32 key0, u32 key1,
                                       int version, Update update) {
    for_each_item(num_chunks, [&](i64 c, int tid) {
        Chunk k = chunk_at(chunks, c);
        if (!present[k.segment]) return;
        const T* b = coefficients + NUM_COEFFICIENTS * k.segment;
        const PassTwo<T> cf = {traces_of(b), b[DECAY], b[LR], b[EPS], b[INV_CU], b[INV_BC1], b[INV_BC2]};
        const T noise_std = b[STD];
        const bool draw = noise_std != (T)0;
        chunk_blocks(k, tid, draw, step_lo, step_hi, key0, key1, version,
                     [&](i64 j, double normal) { update(j, draw ? noise_std * (T)normal : (T)0, cf); });
    });
}

// Pass 2 of the production member: pass 1's f g, u, m, v again (the same operations, so the same
// bits), written once (g only when scaled), then p from them.
template <typename T>
UPGD_DEVICE void pass2_kernel(T* p, T* g, T* u, T* m, T* v, const i64* chunks, const unsigned char* present,
                              const T* coefficients, i64 num_chunks, T factor, int scaled, T u_lo, T inv_range,
                              u32 step_lo, u32 step_hi, u32 key0, u32 key1, int version) {
    update_present_chunks(chunks, present, coefficients, num_chunks, step_lo, step_hi, key0, key1, version,
                          [&](i64 j, T noise, const PassTwo<T>& c) {
        T gj = g[j] * factor;
        if (scaled) g[j] = gj;
        T pj = p[j];
        T uj = new_utility(c.traces, gj, pj, u[j]);
        T mj = new_first(c.traces, gj, m[j]);
        T vj = new_second(c.traces, gj, v[j]);
        u[j] = uj;
        m[j] = mj;
        v[j] = vj;
        p[j] = updated_param(pj, uj, mj, vj, noise, c.decay, c.lr, c.eps, c.inv_cu, c.inv_bc1, c.inv_bc2, u_lo,
                             inv_range);
    });
}

// Pass 2 of any other member (mode: OR of MOMENTS_NONE, PROTECTION_MAX, NOISE_TERMS; the LR
// column holds update_factor lr). Without moments m and v are neither read nor written.
template <typename T>
UPGD_DEVICE void family_pass2_kernel(T* p, T* g, T* u, T* m, T* v, const i64* chunks, const unsigned char* present,
                                     const T* coefficients, i64 num_chunks, T factor, int scaled, T u_lo,
                                     T inv_range, T u_hi, int mode, u32 step_lo, u32 step_hi, u32 key0,
                                     u32 key1, int version) {
    const bool moments = !(mode & MOMENTS_NONE);
    update_present_chunks(chunks, present, coefficients, num_chunks, step_lo, step_hi, key0, key1, version,
                          [&](i64 j, T noise, const PassTwo<T>& c) {
        T gj = g[j] * factor;
        if (scaled) g[j] = gj;
        T pj = p[j];
        T uj = new_utility(c.traces, gj, pj, u[j]);
        u[j] = uj;
        T mj = (T)0, vj = (T)0;
        if (moments) {
            mj = new_first(c.traces, gj, m[j]);
            vj = new_second(c.traces, gj, v[j]);
            m[j] = mj;
            v[j] = vj;
        }
        p[j] = family_param(pj, gj, uj, mj, vj, noise, c.decay, c.lr, c.eps, c.inv_cu, c.inv_bc1, c.inv_bc2,
                            u_lo, inv_range, u_hi, mode);
    });
}

// The standard normals of every chunk, rounded once to T (upgd_ref.noise).
template <typename T>
UPGD_DEVICE void noise_kernel(T* out, const i64* chunks, i64 num_chunks, u32 step_lo, u32 step_hi, u32 key0,
                              u32 key1, int version) {
    for_each_item(num_chunks, [&](i64 c, int tid) {
        chunk_blocks(chunk_at(chunks, c), tid, true, step_lo, step_hi, key0, key1, version,
                     [&](i64 j, double normal) { out[j] = (T)normal; });
    });
}

// --- entry points (one per dtype; names as in cuda_source.KERNEL_SIGNATURES) -------------

#define UPGD_ENTRY_POINTS(T, S)                                                                                \
    UPGD_KERNEL nonfinite_##S(const T* x, const i64* chunks, const unsigned char* present, i64 num_chunks,     \
                              double* partial) {                                                               \
        nonfinite_kernel<T>(x, chunks, present, num_chunks, partial);                                          \
    }                                                                                                          \
    UPGD_KERNEL scale_##S(T* g, const i64* chunks, const unsigned char* present, i64 num_chunks, T factor) {   \
        scale_kernel<T>(g, chunks, present, num_chunks, factor);                                               \
    }                                                                                                          \
    UPGD_KERNEL moments_##S(const T* g, const i64* chunks, const unsigned char* present, i64 num_chunks,       \
                            double* partial) {                                                                 \
        moments_kernel<T>(g, chunks, present, num_chunks, partial);                                            \
    }                                                                                                          \
    UPGD_KERNEL pass1_##S(const T* g, const T* p, const T* u, const T* m, const T* v, const i64* chunks,       \
                          const unsigned char* present, const T* coefficients, i64 num_chunks, T factor,       \
                          int moments, double* partial) {                                                      \
        pass1_kernel<T>(g, p, u, m, v, chunks, present, coefficients, num_chunks, factor, moments, partial);   \
    }                                                                                                          \
    UPGD_KERNEL pass2_##S(T* p, T* g, T* u, T* m, T* v, const i64* chunks, const unsigned char* present,       \
                          const T* coefficients, i64 num_chunks, T factor, int scaled, T u_lo, T inv_range,    \
                          u32 step_lo, u32 step_hi, u32 key0, u32 key1, int version) {                         \
        pass2_kernel<T>(p, g, u, m, v, chunks, present, coefficients, num_chunks, factor, scaled, u_lo,        \
                        inv_range, step_lo, step_hi, key0, key1, version);                                     \
    }                                                                                                          \
    UPGD_KERNEL family_pass2_##S(T* p, T* g, T* u, T* m, T* v, const i64* chunks, const unsigned char* present, \
                                 const T* coefficients, i64 num_chunks, T factor, int scaled, T u_lo,          \
                                 T inv_range, T u_hi, int mode, u32 step_lo, u32 step_hi, u32 key0,            \
                                 u32 key1, int version) {                                                      \
        family_pass2_kernel<T>(p, g, u, m, v, chunks, present, coefficients, num_chunks, factor, scaled, u_lo, \
                               inv_range, u_hi, mode, step_lo, step_hi, key0, key1, version);                  \
    }                                                                                                          \
    UPGD_KERNEL noise_##S(T* out, const i64* chunks, i64 num_chunks, u32 step_lo, u32 step_hi, u32 key0,       \
                          u32 key1, int version) {                                                             \
        noise_kernel<T>(out, chunks, num_chunks, step_lo, step_hi, key0, key1, version);                       \
    }

UPGD_ENTRY_POINTS(float, f32)
UPGD_ENTRY_POINTS(double, f64)

UPGD_KERNEL segment_reduce(const double* partial, const i64* segment_chunks, const unsigned char* present,
                           i64 num_segments, double* out) {
    segment_reduce_kernel(partial, segment_chunks, present, num_segments, out);
}
