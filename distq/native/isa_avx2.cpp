// The bit kernels on AVX2: no vector popcount, so each byte's count comes from a 16-entry
// table (two pshufb per vector) and psadbw adds the eight bytes of each 64-bit lane.
// Compiled with -mavx2 -mpopcnt and run only where the CPU reports them (entry.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "isa_table.h"

namespace distq_native {
namespace avx2 {

struct V {
    static constexpr const char* name = "avx2";
    static constexpr int L = 4;
    static constexpr bool vector_epilogue = false;  // the generic loops of bitops_kernels.inc
    using T = __m256i;

    // 16 vector registers, three of them the popcount's constants and three its temporaries.
    static constexpr int tile_rows(int ga, int gb) { return ga * gb >= 4 ? 1 : 2; }
    static constexpr int tile_cols(int ga, int gb) { return ga != 0 && ga * gb == 1 ? 3 : 2; }

    static inline T zero() { return _mm256_setzero_si256(); }
    static inline T load(const uint64_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
    static inline T bcast(uint64_t x) { return _mm256_set1_epi64x((long long)x); }
    static inline void store(int64_t* p, T v) { _mm256_storeu_si256((__m256i*)p, v); }
    static inline T add(T a, T b) { return _mm256_add_epi64(a, b); }
    static inline T sub(T a, T b) { return _mm256_sub_epi64(a, b); }
    static inline T shl(T a, int s) { return _mm256_slli_epi64(a, s); }
    static inline T popcount(T v) {
        const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2,
                                               3, 2, 3, 3, 4);
        const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
        const __m256i lo = _mm256_and_si256(v, low_nibbles), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
        const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
        return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
    }
    static inline T and_popcount(T acc, T x, T w) { return _mm256_add_epi64(acc, popcount(_mm256_and_si256(x, w))); }
    static inline T xnor_popcount(T acc, T x, T w, T valid) {
        return _mm256_add_epi64(acc, popcount(_mm256_and_si256(_mm256_xor_si256(x, w), valid)));
    }
    static inline int64_t popcount64(uint64_t x) { return __builtin_popcountll(x); }

    // Up to 64 8-bit integers -> one word per plane: each plane's bit moved to the top of its
    // byte, then movemask gathers 32 top bits.
    static inline void byte_planes(const uint8_t* p, int n, int32_t elem, const dq_code& code, uint64_t* out,
                                   int64_t stride) {
        alignas(32) uint8_t tail[64];
        if (n < 64) {
            std::memset(tail, 0, sizeof tail);
            std::memcpy(tail, p, n);
            p = tail;
        }
        const __m256i lo = _mm256_loadu_si256((const __m256i*)p), hi = _mm256_loadu_si256((const __m256i*)(p + 32));
        auto word = [](__m256i a, __m256i b) {
            return (uint64_t)(uint32_t)_mm256_movemask_epi8(a) | ((uint64_t)(uint32_t)_mm256_movemask_epi8(b) << 32);
        };
        const __m256i zero = _mm256_setzero_si256();
        if (code.sign) {
            out[0] = word(_mm256_cmpgt_epi8(lo, zero), _mm256_cmpgt_epi8(hi, zero));
            out[stride] = ~word(_mm256_cmpeq_epi8(lo, zero), _mm256_cmpeq_epi8(hi, zero));
            return;
        }
        for (int i = 0; i < code.planes; ++i) {
            if (i >= 8 && elem != DQ_ELEM_I8) {
                out[i * stride] = 0;
                continue;
            }
            const __m128i up = _mm_cvtsi32_si128(7 - std::min(i, 7));  // an int8's planes past 7 repeat its sign bit
            out[i * stride] = word(_mm256_sll_epi16(lo, up), _mm256_sll_epi16(hi, up));
        }
    }
};

#include "bitops_kernels.inc"

}  // namespace avx2

const IsaKernels* avx2_kernels() { return &avx2::kernels; }

}  // namespace distq_native
