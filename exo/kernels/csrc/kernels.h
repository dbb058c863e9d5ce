// The per-ISA kernel table. Only plain C types cross this boundary: each isa_*.cpp is compiled with
// its own -m flags, so nothing inline (no std templates, no MLX headers) may be shared with them, or
// the linker could keep an AVX-512 copy of a function the portable path calls (SIGILL).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace exo_kernels {

enum ScaleType { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct QmmArgs {
  const float* x;  // [M, K] row-major; within each group the odd elements follow the even ones for 4 bits
  int64_t M, K, N;
  const uint32_t* w;  // [N, K * bits / 32]
  const void* scales;  // [N, K / gs]
  const void* biases;
  int scale_type, bits, gs;
  const float* xsum;  // [M, K / gs] sums of x over each group, for the biases (of xq * xd for int8_x)
  // x as int8, for a table with int8_x set: each group scaled by its largest magnitude to [-127, 127].
  // For 4 bits a row is the K/2 elements the low nibbles multiply (x[2j]), then the K/2 of the high ones.
  const int8_t* xq;  // [M, K]
  const float* xd;  // [M, K / gs] each group's scale: x ~= xq * xd
  float* y;  // [M, N]
};

struct AttnArgs {
  const float* q;  // [D] one head's query
  const void* k;  // first position of the kv head; positions `kt` elements apart
  const void* v;
  int64_t length, D, kt, vt;
  int kv_half;  // keys and values are float16 (else float32)
  float scale;
  float* scores;  // [length] scratch
  float* row;  // [D] scratch: one float16 position as float32
  float* out;  // [D]
};

struct KernelTable {
  const char* name;
  int int8_x;  // whether qmm reads x as int8 (xq, xd) rather than float (x)
  void (*qmm)(const QmmArgs* a, int64_t n0, int64_t n1);  // output columns [n0, n1)
  void (*rms_norm_row)(const float* x, const float* w, float* y, int64_t D, float eps);
  // rotates pairs (x[i], x[i + half]) or (x[2i], x[2i+1]) of one row by cos/sin tables of `half` entries
  void (*rope_row)(const float* x, float* y, const float* cs, const float* sn, int64_t half, int traditional);
  void (*attn_head)(const AttnArgs* a);
  // y[i] = act(gate[i]) * up[i] for i < n; act 0: silu, 1: gelu's tanh approximation
  void (*gated_row)(const float* gate, const float* up, float* y, int64_t n, int act);
};

extern const KernelTable kPortable;
extern const KernelTable kAvx2;
extern const KernelTable kAvx512;
extern const KernelTable kAvx512Vnni;

}  // namespace exo_kernels
