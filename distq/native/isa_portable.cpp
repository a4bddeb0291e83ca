// The bit kernels in plain C++ (one 64-bit word per "vector"): any CPU, any compiler. On x86
// the dispatcher prefers AVX2 or AVX-512; this build is also what other architectures run.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "isa_table.h"

namespace distq_native {
namespace portable {

struct V {
    static constexpr const char* name = "portable";
    static constexpr int L = 1;
    static constexpr bool vector_epilogue = false;  // the generic loops of bitops_kernels.inc
    using T = uint64_t;

    static constexpr int tile_rows(int ga, int gb) { return ga * gb >= 4 ? 1 : 2; }
    static constexpr int tile_cols(int ga, int gb) { return ga != 0 && ga * gb >= 2 ? 2 : 4; }

    static inline T zero() { return 0; }
    static inline T load(const uint64_t* p) { return *p; }
    static inline T bcast(uint64_t x) { return x; }
    static inline void store(int64_t* p, T v) { *p = (int64_t)v; }  // two's complement: signed sums wrap back exactly
    static inline T add(T a, T b) { return a + b; }
    static inline T sub(T a, T b) { return a - b; }
    static inline T shl(T a, int s) { return a << s; }
    static inline int64_t popcount64(uint64_t x) { return __builtin_popcountll(x); }
    static inline T and_popcount(T acc, T x, T w) { return acc + (T)popcount64(x & w); }
    static inline T xnor_popcount(T acc, T x, T w, T valid) { return acc + (T)popcount64((x ^ w) & valid); }

    // Eight bytes at a time: (v >> bit) & 0x01.. leaves one bit per byte, and the multiply by
    // 0x0102040810204080 moves byte b's bit to bit 56 + b without carries.
    static inline uint64_t gather(uint64_t lsbs) { return (lsbs * 0x0102040810204080ULL) >> 56; }
    static inline void byte_planes(const uint8_t* p, int n, int32_t elem, const dq_code& code, uint64_t* out,
                                   int64_t stride) {
        constexpr uint64_t lsb = 0x0101010101010101ULL;
        for (int i = 0; i < code.planes; ++i) out[i * stride] = 0;
        for (int g = 0; g * 8 < n; ++g) {
            uint64_t v = 0;
            std::memcpy(&v, p + g * 8, std::min(8, n - g * 8));
            if (code.sign) {
                uint64_t nonzero = v | (v >> 4);
                nonzero |= nonzero >> 2;
                nonzero |= nonzero >> 1;  // bit 0 of each byte: any bit of that byte set
                nonzero &= lsb;
                out[0] |= gather(nonzero & ~((v >> 7) & lsb)) << (g * 8);
                out[stride] |= gather(nonzero) << (g * 8);
                continue;
            }
            for (int i = 0; i < code.planes; ++i) {
                if (i >= 8 && elem != DQ_ELEM_I8) continue;
                out[i * stride] |= gather((v >> std::min(i, 7)) & lsb) << (g * 8);  // int8 planes past 7: the sign bit
            }
        }
    }
};

#include "bitops_kernels.inc"

}  // namespace portable

const IsaKernels* portable_kernels() { return &portable::kernels; }

}  // namespace distq_native
