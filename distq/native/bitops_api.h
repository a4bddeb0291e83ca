// The C interface of the native kernels (bit kernels, CPU quantizer loops), shared by every translation unit and mirrored
// field for field by ctypes structures in distq/native/library.py.
//
// Operands are bit planes packed along the reduction dimension into 64-bit words: bit k of
// a row of K binary values is bit k % 64 of word k / 64, and the tail of the last word is
// zero. An integer operand is a signed sum of planes, x = sum_i (-1)^neg_i 2^shift_i x_i,
// so a dot product is sum_ij +-2^(s_i + t_j) popcount(x_i & w_j) (AND + popcount), or for
// +-1 operands n_valid - 2 popcount((x ^ w) & valid) (XNOR + popcount).
#pragma once

#include <cstdint>

extern "C" {

enum { DQ_MAX_PLANES = 32 };

// How the integers of one operand split into binary planes.
typedef struct {
    int32_t planes;
    int32_t sign;  // 1: planes are (x > 0, x != 0) of values in {-1, 0, +1} (0 = padding)
    int32_t shift[DQ_MAX_PLANES];
    int32_t negative[DQ_MAX_PLANES];
} dq_code;

// A conv or linear layer's weight, packed once when the engine is built. A linear is a
// 1x1 conv over a 1x1 image whose channels are the in-features.
typedef struct {
    const uint64_t* words;  // [k_words][code.planes][out_padded]: one word of every output channel side by side
    int64_t out;
    int64_t out_padded;  // out rounded up to a multiple of 8 (the widest vector), zero-filled
    int64_t k_words;     // ceil(kernel_h * kernel_w * in_channels / 64)
    int64_t offset;      // added to every weight: DoReFa's 2q - (2^k - 1) stores the planes of q and -(2^k - 1)
    int32_t in_channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
    dq_code code;  // code.sign: +-1 weights stored as the one plane (w > 0), for XNOR with sign activations
} dq_layer;

enum { DQ_OUT_FLOAT32 = 0, DQ_OUT_FLOAT64 = 1, DQ_OUT_INT64 = 2 };
enum { DQ_ELEM_U8 = 0, DQ_ELEM_I8 = 1, DQ_ELEM_I16 = 2, DQ_ELEM_I32 = 3 };
enum { DQ_ISA_PORTABLE = 0, DQ_ISA_AVX2 = 1, DQ_ISA_AVX512 = 2 };

// Pack the integers of a (rows, cols) matrix into planes: out is [rows][code.planes][ceil(cols / 64)].
int dq_pack(const void* ints, int32_t elem, int64_t rows, int64_t cols, const dq_code* code, uint64_t* out, int32_t threads);

// Convolution of channels-last integers ints[n][h][w][in_channels] (element type `elem`, planes
// as `act` says) with a packed layer. The input is packed here, line by line (pixel x of an
// image line at bits x * in_channels ...), then im2col and the GEMM run on those bits.
// values[(n, oy, ox)][o] (row-major) receives the exact integer dot product (DQ_OUT_INT64), or
// y = acc * scale[o] + shift[o] computed in float64 and stored as float32/float64; with a
// residual (same type and layout as values, or null) y = (that y) + residual, one more
// rounding, as a separate add would do; with levels > 0 values receive instead the next
// DoReFa activation's value q / levels, and codes its integer q = round(clamp(y, 0, 1) *
// levels), exactly as dq_quantize_unit would from y.
int dq_bit_conv(const dq_layer* layer, const dq_code* act, const void* ints, int32_t elem, int64_t n, int64_t h, int64_t w,
                const double* scale, const double* shift, const void* residual, int32_t out_kind, int32_t levels, void* values,
                uint8_t* codes, int32_t threads);

// DoReFa activation quantizer on a dense float32/float64 buffer: ints = round(clamp(x, 0, 1) * levels)
// (round half to even, as torch.round) and values = ints / levels in the same float type.
int dq_quantize_unit(const void* x, int32_t is_double, int64_t count, int32_t levels, uint8_t* ints, void* values,
                     int32_t threads);

// A float conv's per-channel affine, y * scale + shift (a multiply and an add, each rounded, as
// torch computes them), reading NCHW and writing NHWC: the layout every native layer reads.
// With levels > 0, out receives the next DoReFa activation's values and codes its integers,
// as dq_quantize_unit would give from the affine's output.
int dq_affine_to_channels_last(const void* y, int32_t is_double, int64_t n, int64_t c, int64_t hw, const void* scale,
                               const void* shift, int32_t levels, void* out, uint8_t* codes, int32_t threads);

// Max pooling of channels-last uint8 codes [n][h][w][c] over windows geometry = (kernel_h, kernel_w,
// stride_h, stride_w, pad_h, pad_w) (dilation 1, floor mode); out_values[i] = values[out[i]].
int dq_max_pool_codes(const uint8_t* x, int64_t n, int64_t h, int64_t w, int64_t c, const int32_t* geometry,
                      const void* values, int32_t is_double, uint8_t* out, void* out_values, int32_t threads);

// CPU time (of the whole process) spent inside dq_bit_conv, for benchmarks: seconds[0]
// packing the input, [1] im2col, [2] the GEMM with its epilogue, summed since the last call;
// then resets them and turns the timing (a clock read per part) on or off.
void dq_profile(int32_t on, double* seconds);

// The float stem in one pass: a float conv's NCHW output y -> its affine (as
// dq_affine_to_channels_last), DoReFa activation of `levels` and max pool (as
// dq_max_pool_codes), writing only the pooled integers and values, channels-last.
int dq_affine_quantize_pool(const void* y, int32_t is_double, int64_t n, int64_t c, int64_t h, int64_t w, const void* scale,
                            const void* shift, int32_t levels, const int32_t* geometry, void* values, uint8_t* codes,
                            int32_t threads);

// The training activation quantizer (distq.quant.eager on the CPU): y = Q_levels(clamp(x, 0, 1))
// rounded step by step as torch computes it, and mask = 1 where the clamp left x unchanged
// (mask may be null: no mask wanted). 1 <= levels <= 255.
int dq_act_quant_train(const float* x, float* y, uint8_t* mask, int64_t count, int32_t levels, int32_t threads);

// Its backward: out = grad * mask, the product torch computes with a uint8 mask.
int dq_masked_grad_train(const float* grad, const uint8_t* mask, float* out, int64_t count, int32_t threads);

// DoReFa k-bit weights in training (distq.quant.eager on the CPU), over `rows` rows of row_len
// floats with the scale s[r] of each (rows = 1: per tensor), each step rounded as torch rounds it.
// Forward, from t = tanh(w): q = round((t / (2 s) + 1/2) levels) / (levels / 2) - 1.
int dq_dorefa_forward_train(const float* t, const float* s, float* q, int64_t rows, int64_t row_len, int32_t levels,
                            int32_t threads);
// Backward, first pass: terms = (t / 2s) / 2s * g (for torch to sum) and peaks[r] = #{|t| == s}.
int dq_dorefa_backward_terms(const float* t, const float* s, const float* g, float* terms, int64_t* peaks, int64_t rows,
                             int64_t row_len, int32_t threads);
// Backward, second pass: out = copysign(|t| == s, t) * share[r] + g / s (tanh' is torch's, after).
int dq_dorefa_backward_grad(const float* t, const float* s, const float* share, const float* g, float* out, int64_t rows,
                            int64_t row_len, int32_t threads);

int dq_best_isa(void);                // the widest instruction set this CPU and build support
int dq_set_isa(int32_t isa);          // 0 on success, -1 if not supported here
int dq_current_isa(void);
const char* dq_isa_name(int32_t isa);
}
