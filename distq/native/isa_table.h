// What each instruction-set translation unit (isa_*.cpp) provides to the dispatcher (entry.cpp).
#pragma once

#include "bitops_api.h"

namespace distq_native {

// One GEMM of packed activation rows with a packed layer, and its fused epilogue.
struct GemmArgs {
    const dq_layer* layer;
    const dq_code* act;
    const uint64_t* rows;   // [m][act->planes][layer->k_words]
    const int64_t* rowsum;  // per row: the sum of its integers (times layer->offset), or for XNOR its valid count
    int64_t m;
    bool xnor;
    const double* scale;  // [layer->out], for float outputs
    const double* shift;
    const void* residual;  // [m][layer->out] of the output's float type, added to y; or null
    int32_t out_kind;
    int32_t levels;  // > 0: quantize y into the next DoReFa activation
    void* values;    // [m][layer->out]
    uint8_t* codes;  // [m][layer->out] when levels > 0
};

// im2col on packed input lines: the bit rows of every output position, and each row's sum.
struct Im2colArgs {
    const dq_layer* layer;
    const dq_code* act;
    const uint64_t* lines;  // [n * h][act->planes][ceil(w * in_channels / 64)]
    int64_t n, h, w, oh, ow;
    int64_t first_line, line_count;  // the output lines (image, oy) to do, numbered over the batch
    uint64_t* rows;                  // [line_count * ow][act->planes][layer->k_words]; unused when the rows are the lines
    int64_t* rowsum;                 // [line_count * ow]
    bool xnor;
    bool rows_are_lines;  // one pixel per line (a linear), 1x1 kernel: nothing to copy, only the sums
};

struct IsaKernels {
    const char* name;
    void (*pack)(const void* ints, int32_t elem, int64_t rows, int64_t cols, const dq_code* code, uint64_t* out,
                 int32_t threads);
    void (*im2col)(const Im2colArgs& args, int32_t threads);
    void (*gemm)(const GemmArgs& args, int32_t threads);
    void (*quantize)(const void* x, int32_t is_double, int64_t count, int32_t levels, uint8_t* ints, void* values,
                     int32_t threads);
    void (*affine_to_channels_last)(const void* y, int32_t is_double, int64_t n, int64_t c, int64_t hw, const void* scale,
                                    const void* shift, int32_t levels, void* out, uint8_t* codes, int32_t threads);
    void (*max_pool_codes)(const uint8_t* x, int64_t n, int64_t h, int64_t w, int64_t c, const int32_t* geometry, int64_t oh,
                           int64_t ow, const void* values, int32_t is_double, uint8_t* out, void* out_values, int32_t threads);
    void (*affine_quantize_pool)(const void* y, int32_t is_double, int64_t n, int64_t c, int64_t h, int64_t w,
                                 const void* scale, const void* shift, int32_t levels, const int32_t* geometry, int64_t oh,
                                 int64_t ow, void* values, uint8_t* codes, int32_t threads);
    void (*act_quant_train)(const float* x, float* y, uint8_t* mask, int64_t count, int32_t levels, int32_t threads);
    void (*masked_grad_train)(const float* grad, const uint8_t* mask, float* out, int64_t count, int32_t threads);
    void (*dorefa_forward_train)(const float* t, const float* s, float* q, int64_t rows, int64_t row_len, int32_t levels,
                                 int32_t threads);
    void (*dorefa_backward_terms)(const float* t, const float* s, const float* g, float* terms, int64_t* peaks, int64_t rows,
                                  int64_t row_len, int32_t threads);
    void (*dorefa_backward_grad)(const float* t, const float* s, const float* share, const float* g, float* out, int64_t rows,
                                 int64_t row_len, int32_t threads);
};

const IsaKernels* portable_kernels();
#ifdef DQ_WITH_X86
const IsaKernels* avx2_kernels();
const IsaKernels* avx512_kernels();
#endif

}  // namespace distq_native
