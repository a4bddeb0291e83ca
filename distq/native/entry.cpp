// The C entry points: pick the instruction set once (the widest the CPU supports, or the one
// dq_set_isa chose), keep per-thread scratch buffers, and run packing, im2col and GEMM.
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "isa_table.h"

using namespace distq_native;

namespace {

const IsaKernels* kernels_for(int isa) {
    switch (isa) {
        case DQ_ISA_PORTABLE:
            return portable_kernels();
#ifdef DQ_WITH_X86
        case DQ_ISA_AVX2:
            __builtin_cpu_init();
            if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return avx2_kernels();
            return nullptr;
        case DQ_ISA_AVX512:
            __builtin_cpu_init();
            if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt"))
                return avx512_kernels();
            return nullptr;
#endif
        default:
            return nullptr;
    }
}

int chosen_isa = -1;

// dq_profile's counters, in nanoseconds of CPU time of the process (all threads, like Python's
// time.process_time, so the parts add up with a total measured that way): packing, im2col, GEMM.
std::atomic<bool> profiling{false};
std::atomic<int64_t> profile_ns[3];

int64_t now_ns() {
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

const IsaKernels* active() {
    if (chosen_isa < 0) chosen_isa = dq_best_isa();
    return kernels_for(chosen_isa);
}

// A grow-only buffer per thread: the im2col rows of a large layer are megabytes, and fresh
// pages on every call would cost more than filling them.
template <typename T>
T* scratch(std::unique_ptr<T[]>& buffer, int64_t& capacity, int64_t size) {
    if (size > capacity) {
        buffer.reset(new T[size]);
        capacity = size;
    }
    return buffer.get();
}

// The output size of a max pool, or false where torch would refuse its geometry.
bool pool_output(const int32_t* geometry, int64_t h, int64_t w, int64_t& oh, int64_t& ow) {
    const int32_t kh = geometry[0], kw = geometry[1], sh = geometry[2], sw = geometry[3], ph = geometry[4], pw = geometry[5];
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || 2 * ph > kh || 2 * pw > kw) return false;
    oh = (h + 2 * ph - kh) / sh + 1;
    ow = (w + 2 * pw - kw) / sw + 1;
    return oh > 0 && ow > 0;
}

}  // namespace

extern "C" {

void dq_profile(int32_t on, double* seconds) {
    for (int i = 0; i < 3; ++i) {
        const int64_t ns = profile_ns[i].exchange(0);
        if (seconds) seconds[i] = ns * 1e-9;
    }
    profiling = on != 0;
}

int dq_best_isa(void) {
    for (int isa = DQ_ISA_AVX512; isa > DQ_ISA_PORTABLE; --isa)
        if (kernels_for(isa)) return isa;
    return DQ_ISA_PORTABLE;
}

int dq_set_isa(int32_t isa) {
    if (!kernels_for(isa)) return -1;
    chosen_isa = isa;
    return 0;
}

int dq_current_isa(void) {
    active();
    return chosen_isa;
}

const char* dq_isa_name(int32_t isa) {
    const IsaKernels* k = kernels_for(isa);
    return k ? k->name : "unsupported";
}

int dq_pack(const void* ints, int32_t elem, int64_t rows, int64_t cols, const dq_code* code, uint64_t* out,
            int32_t threads) {
    if (code->planes < 1 || code->planes > DQ_MAX_PLANES || (code->sign && code->planes != 2)) return -1;
    if (elem < DQ_ELEM_U8 || elem > DQ_ELEM_I32) return -1;
    active()->pack(ints, elem, rows, cols, code, out, threads);
    return 0;
}

int dq_bit_conv(const dq_layer* layer, const dq_code* act, const void* ints, int32_t elem, int64_t n, int64_t h, int64_t w,
                const double* scale, const double* shift, const void* residual, int32_t out_kind, int32_t levels, void* values,
                uint8_t* codes, int32_t threads) {
    const dq_layer& L = *layer;
    const int64_t oh = (h + 2 * L.pad_h - L.kernel_h) / L.stride_h + 1;
    const int64_t ow = (w + 2 * L.pad_w - L.kernel_w) / L.stride_w + 1;
    if (oh <= 0 || ow <= 0 || act->planes < 1 || act->planes > DQ_MAX_PLANES) return -1;
    if ((int64_t)L.kernel_h * L.kernel_w * L.in_channels > 64 * L.k_words) return -1;
    if (elem < DQ_ELEM_U8 || elem > DQ_ELEM_I32 || (act->sign && act->planes != 2)) return -1;
    if (levels < 0 || levels > 255 || ((levels > 0 || residual) && out_kind == DQ_OUT_INT64)) return -1;
    const bool xnor = act->sign && L.code.sign;
    const int64_t m = n * oh * ow;
    // A line of one pixel (a linear layer) under a 1x1 kernel is already a bit row.
    const bool rows_are_lines = w == 1 && L.kernel_h == 1 && L.kernel_w == 1 && L.stride_h == 1 && L.stride_w == 1 &&
                                L.pad_h == 0 && L.pad_w == 0;

    // The bit rows are made and consumed a chunk of whole output lines at a time, about
    // kChunkBytes of them: the GEMM reads a chunk once per block of output channels, from L2
    // instead of memory when the whole batch's rows would not fit (ResNet-18's first layers
    // at batch 64: 14 MB).
    constexpr int64_t kChunkBytes = 256 << 10;
    const int64_t row_words = act->planes * L.k_words, out_lines = n * oh;
    const int64_t chunk_lines =
        rows_are_lines ? out_lines : std::max<int64_t>(1, std::min<int64_t>(out_lines, kChunkBytes / (8 * row_words * ow)));

    thread_local std::unique_ptr<uint64_t[]> line_buffer, row_buffer;
    thread_local std::unique_ptr<int64_t[]> sum_buffer;
    thread_local int64_t line_capacity = 0, row_capacity = 0, sum_capacity = 0;
    const int64_t line_words = (w * L.in_channels + 63) / 64;
    uint64_t* lines = scratch(line_buffer, line_capacity, n * h * act->planes * line_words);
    uint64_t* rows = rows_are_lines ? lines : scratch(row_buffer, row_capacity, chunk_lines * ow * row_words);
    int64_t* sums = scratch(sum_buffer, sum_capacity, m);

    const IsaKernels* k = active();
    const bool timed = profiling.load(std::memory_order_relaxed);
    int64_t t0 = timed ? now_ns() : 0;
    k->pack(ints, elem, n * h, w * L.in_channels, act, lines, threads);
    if (timed) profile_ns[0] += now_ns() - t0;
    const int64_t value_bytes = out_kind == DQ_OUT_FLOAT32 ? 4 : 8;
    for (int64_t first = 0; first < out_lines; first += chunk_lines) {
        const int64_t count = std::min(chunk_lines, out_lines - first), m0 = first * ow;
        const int64_t at = m0 * L.out * value_bytes;  // byte offset of the chunk's first output row
        if (timed) t0 = now_ns();
        k->im2col(Im2colArgs{layer, act, lines, n, h, w, oh, ow, first, count, rows, sums + m0, xnor, rows_are_lines}, threads);
        const int64_t t1 = timed ? now_ns() : 0;
        k->gemm(GemmArgs{layer, act, rows_are_lines ? rows + m0 * row_words : rows, sums + m0, count * ow, xnor, scale, shift,
                         residual ? (const char*)residual + at : nullptr, out_kind, levels, (char*)values + at,
                         codes ? codes + m0 * L.out : nullptr},
                threads);
        if (timed) {
            profile_ns[1] += t1 - t0;
            profile_ns[2] += now_ns() - t1;
        }
    }
    return 0;
}

int dq_quantize_unit(const void* x, int32_t is_double, int64_t count, int32_t levels, uint8_t* ints, void* values,
                     int32_t threads) {
    if (levels < 1 || levels > 255) return -1;
    active()->quantize(x, is_double, count, levels, ints, values, threads);
    return 0;
}

int dq_affine_to_channels_last(const void* y, int32_t is_double, int64_t n, int64_t c, int64_t hw, const void* scale,
                               const void* shift, int32_t levels, void* out, uint8_t* codes, int32_t threads) {
    if (levels < 0 || levels > 255 || (levels > 0 && !codes)) return -1;
    active()->affine_to_channels_last(y, is_double, n, c, hw, scale, shift, levels, out, codes, threads);
    return 0;
}

int dq_max_pool_codes(const uint8_t* x, int64_t n, int64_t h, int64_t w, int64_t c, const int32_t* geometry,
                      const void* values, int32_t is_double, uint8_t* out, void* out_values, int32_t threads) {
    int64_t oh, ow;
    if (!pool_output(geometry, h, w, oh, ow)) return -1;
    active()->max_pool_codes(x, n, h, w, c, geometry, oh, ow, values, is_double, out, out_values, threads);
    return 0;
}

int dq_affine_quantize_pool(const void* y, int32_t is_double, int64_t n, int64_t c, int64_t h, int64_t w, const void* scale,
                            const void* shift, int32_t levels, const int32_t* geometry, void* values, uint8_t* codes,
                            int32_t threads) {
    int64_t oh, ow;
    if (levels < 1 || levels > 255 || !pool_output(geometry, h, w, oh, ow)) return -1;
    active()->affine_quantize_pool(y, is_double, n, c, h, w, scale, shift, levels, geometry, oh, ow, values, codes, threads);
    return 0;
}

int dq_act_quant_train(const float* x, float* y, uint8_t* mask, int64_t count, int32_t levels, int32_t threads) {
    if (levels < 1 || levels > 255 || count < 0) return -1;
    active()->act_quant_train(x, y, mask, count, levels, threads);
    return 0;
}

int dq_masked_grad_train(const float* grad, const uint8_t* mask, float* out, int64_t count, int32_t threads) {
    if (count < 0) return -1;
    active()->masked_grad_train(grad, mask, out, count, threads);
    return 0;
}

int dq_dorefa_forward_train(const float* t, const float* s, float* q, int64_t rows, int64_t row_len, int32_t levels,
                            int32_t threads) {
    if (levels < 1 || levels > 255 || rows < 1 || row_len < 0) return -1;
    active()->dorefa_forward_train(t, s, q, rows, row_len, levels, threads);
    return 0;
}

int dq_dorefa_backward_terms(const float* t, const float* s, const float* g, float* terms, int64_t* peaks, int64_t rows,
                             int64_t row_len, int32_t threads) {
    if (rows < 1 || row_len < 0) return -1;
    active()->dorefa_backward_terms(t, s, g, terms, peaks, rows, row_len, threads);
    return 0;
}

int dq_dorefa_backward_grad(const float* t, const float* s, const float* share, const float* g, float* out, int64_t rows,
                            int64_t row_len, int32_t threads) {
    if (rows < 1 || row_len < 0) return -1;
    active()->dorefa_backward_grad(t, s, share, g, out, rows, row_len, threads);
    return 0;
}

}  // extern "C"
