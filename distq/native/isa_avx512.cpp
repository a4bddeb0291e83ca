// The bit kernels on AVX-512 with VPOPCNTDQ: a popcount of eight 64-bit lanes per instruction,
// and (x ^ w) & valid in one ternary-logic instruction. Compiled with -mavx512{f,bw,dq,vl,vpopcntdq}
// and run only where the CPU reports them (entry.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "isa_table.h"

namespace distq_native {
namespace avx512 {

struct V {
    static constexpr const char* name = "avx512";
    static constexpr int L = 8;
    using T = __m512i;

    // 32 vector registers: 24 accumulators, the tile's weight vectors and one broadcast.
    static constexpr int tile_rows(int ga, int gb) { return ga == 0 || ga * gb == 1 ? 6 : ga * gb == 2 ? 4 : 3; }
    static constexpr int tile_cols(int ga, int gb) { return ga == 0 || ga * gb == 1 ? 4 : ga * gb == 2 ? 3 : 2; }

    static inline T zero() { return _mm512_setzero_si512(); }
    static inline T load(const uint64_t* p) { return _mm512_loadu_si512((const void*)p); }
    static inline T bcast(uint64_t x) { return _mm512_set1_epi64((long long)x); }
    static inline void store(int64_t* p, T v) { _mm512_storeu_si512((void*)p, v); }
    static inline T add(T a, T b) { return _mm512_add_epi64(a, b); }
    static inline T sub(T a, T b) { return _mm512_sub_epi64(a, b); }
    static inline T shl(T a, int s) { return _mm512_slli_epi64(a, (unsigned)s); }
    static inline T and_popcount(T acc, T x, T w) { return _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(x, w))); }
    static inline T xnor_popcount(T acc, T x, T w, T valid) {
        // 0x28 is the truth table of (a ^ b) & c.
        return _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(x, w, valid, 0x28)));
    }
    static inline int64_t popcount64(uint64_t x) { return __builtin_popcountll(x); }

    // The epilogue, 8 outputs at a time (masked at the row's end): acc * scale + shift in
    // float64 as a multiply then an add, each rounded, like the reference; then the residual
    // added in the output's type.
    static constexpr bool vector_epilogue = true;
    static inline __mmask8 lanes(int64_t left) { return left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1); }
    static inline __m512d affine8(const int64_t* acc, const double* scale, const double* shift, __mmask8 m) {
        const __m512d a = _mm512_cvtepi64_pd(_mm512_maskz_loadu_epi64(m, acc));
        return _mm512_add_pd(_mm512_mul_pd(a, _mm512_maskz_loadu_pd(m, scale)), _mm512_maskz_loadu_pd(m, shift));
    }
    static inline __m256 output8(const int64_t* acc, const double* scale, const double* shift, const float* residual,
                                 __mmask8 m) {
        const __m256 y = _mm512_cvtpd_ps(affine8(acc, scale, shift, m));
        return residual ? _mm256_add_ps(y, _mm256_maskz_loadu_ps(m, residual)) : y;
    }
    static inline __m512d output8(const int64_t* acc, const double* scale, const double* shift, const double* residual,
                                  __mmask8 m) {
        const __m512d y = affine8(acc, scale, shift, m);
        return residual ? _mm512_add_pd(y, _mm512_maskz_loadu_pd(m, residual)) : y;
    }
    template <typename F>
    static inline void affine(const int64_t* acc, const double* scale, const double* shift, const F* residual, F* y,
                              int64_t n) {
        for (int64_t o = 0; o < n; o += 8) {
            const __mmask8 m = lanes(n - o);
            const auto v = output8(acc + o, scale + o, shift + o, residual ? residual + o : nullptr, m);
            if constexpr (sizeof(F) == 4)
                _mm256_mask_storeu_ps(y + o, m, v);
            else
                _mm512_mask_storeu_pd(y + o, m, v);
        }
    }
    // quantize_unit_value on 8 lanes: clamp as std::min(std::max(x, 0), 1) (max/min here take
    // their second operand on ties, so -0 becomes +0, which rounds to the same integer), round
    // half to even; the value comes from the integer, q / levels.
    static constexpr int round_even = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    static inline __m256i quantize8(__m256 y, float levels) {
        const __m256 c = _mm256_min_ps(_mm256_max_ps(y, _mm256_setzero_ps()), _mm256_set1_ps(1.0f));
        return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(levels)), round_even));
    }
    static inline __m256i quantize8(__m512d y, double levels) {
        const __m512d c = _mm512_min_pd(_mm512_max_pd(y, _mm512_setzero_pd()), _mm512_set1_pd(1.0));
        return _mm512_cvtpd_epi32(_mm512_roundscale_pd(_mm512_mul_pd(c, _mm512_set1_pd(levels)), round_even));
    }
    static inline void store_values(float* values, __mmask8 m, __m256i q, float levels) {
        _mm256_mask_storeu_ps(values, m, _mm256_div_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(levels)));
    }
    static inline void store_values(double* values, __mmask8 m, __m256i q, double levels) {
        _mm512_mask_storeu_pd(values, m, _mm512_div_pd(_mm512_cvtepi32_pd(q), _mm512_set1_pd(levels)));
    }
    template <typename F>
    static inline void affine_quantize(const int64_t* acc, const double* scale, const double* shift, const F* residual,
                                       F levels, F* values, uint8_t* codes, int64_t n) {
        for (int64_t o = 0; o < n; o += 8) {
            const __mmask8 m = lanes(n - o);
            const __m256i q = quantize8(output8(acc + o, scale + o, shift + o, residual ? residual + o : nullptr, m), levels);
            _mm_mask_storeu_epi8(codes + o, m, _mm256_cvtepi32_epi8(q));
            store_values(values + o, m, q, levels);
        }
    }

    // Up to 64 8-bit integers -> one word per plane: a masked load, then a bit test per plane.
    static inline void byte_planes(const uint8_t* p, int n, int32_t elem, const dq_code& code, uint64_t* out,
                                   int64_t stride) {
        const __mmask64 valid_bytes = n >= 64 ? ~0ULL : ((1ULL << n) - 1);
        const __m512i v = _mm512_maskz_loadu_epi8(valid_bytes, p);
        if (code.sign) {
            out[0] = _mm512_cmpgt_epi8_mask(v, _mm512_setzero_si512());
            out[stride] = _mm512_test_epi8_mask(v, v);
            return;
        }
        for (int i = 0; i < code.planes; ++i) {
            if (i >= 8 && elem != DQ_ELEM_I8) {
                out[i * stride] = 0;
                continue;
            }
            const int bit = std::min(i, 7);  // an int8's planes past 7 repeat its sign bit
            out[i * stride] = _mm512_test_epi8_mask(v, _mm512_set1_epi8((char)(1 << bit)));
        }
    }
};

#include "bitops_kernels.inc"

}  // namespace avx512

const IsaKernels* avx512_kernels() { return &avx512::kernels; }

}  // namespace distq_native
