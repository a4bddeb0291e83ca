// The bit kernels on AVX-512 with VPOPCNTDQ: a popcount of eight 64-bit lanes per instruction,
// and (x ^ w) & valid in one ternary-logic instruction. Compiled with -mavx512{f,bw,dq,vl,vpopcntdq}
// and run only where the CPU reports them (entry.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

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
