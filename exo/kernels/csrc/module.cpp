// exo's CPU kernels as MLX primitives, and the nanobind module `exo.kernels._native`.
// Each primitive allocates its output in eval_cpu and dispatches the work onto MLX's CPU stream;
// the work itself runs through the kernel table of the chosen path (kernels.h), split over the pool.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "mlx/version.h"

#include "kernels.h"
#include "pool.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace exo_kernels {
namespace {

// Weights from this size up are split over the pool; below it, waking a worker costs more than it saves.
constexpr int64_t kParallelBytes = 256 << 10;

const KernelTable* g_table = &kPortable;
int g_threads = 1;
Pool* g_pool = nullptr;  // made on first use; a forked child drops its parent's (threads do not survive fork)

std::mutex g_pool_mu;

// The pool for the configured thread count. A pool being replaced may still be running a job on
// another stream's thread, so old pools are kept, not deleted (select() is rare: tests and benches).
Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_pool == nullptr || g_pool->threads() != g_threads) g_pool = new Pool(g_threads);
  return *g_pool;
}

void forget_pool_in_child() { g_pool = nullptr; }

// Byte offsets of each row (all dims but the last) of `a`, and the last dim's stride in elements.
std::vector<int64_t> row_offsets(const mx::array& a) {
  const int nd = a.ndim();
  int64_t rows = 1;
  for (int i = 0; i + 1 < nd; i++) rows *= a.shape(i);
  std::vector<int64_t> offs(rows);
  std::vector<int> idx(nd > 1 ? nd - 1 : 1, 0);
  int64_t off = 0;
  for (int64_t r = 0; r < rows; r++) {
    offs[r] = off * (int64_t)a.itemsize();
    for (int d = nd - 2; d >= 0; d--) {  // odometer over the leading dims
      off += a.strides()[d];
      if (++idx[d] < a.shape(d)) break;
      off -= a.strides()[d] * a.shape(d);
      idx[d] = 0;
    }
  }
  return offs;
}

// `a` as a dense row-major buffer: its own memory when it already is one, else a gathered copy.
const void* dense(const mx::array& a, std::vector<char>& keep) {
  if (a.flags().row_contiguous) return a.data<char>();
  const int64_t cols = a.ndim() ? a.shape(-1) : 1, es = a.itemsize(), cs = a.ndim() ? a.strides().back() * es : 0;
  auto offs = row_offsets(a);
  keep.resize(offs.size() * cols * es);
  const char* src = a.data<char>();
  for (size_t r = 0; r < offs.size(); r++)
    for (int64_t c = 0; c < cols; c++) std::memcpy(&keep[(r * cols + c) * es], src + offs[r] + c * cs, es);
  return keep.data();
}

void alloc(mx::array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

int scale_type(mx::Dtype t) {
  if (t == mx::float32) return kF32;
  if (t == mx::float16) return kF16;
  if (t == mx::bfloat16) return kBF16;
  throw std::invalid_argument("quantized_matmul: scales and biases must be float32, float16 or bfloat16");
}

// What every kernel here shares: it runs on the CPU only, and its work goes to the stream's command
// encoder with its inputs and output registered, so MLX keeps their buffers alive until it has run.
class CpuPrimitive : public mx::UnaryPrimitive {
 public:
  explicit CpuPrimitive(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("exo kernels run on the CPU only");
  }

 protected:
  template <class Work>
  void encode(const std::vector<mx::array>& in, mx::array& out, Work&& work) {
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch(std::forward<Work>(work));
  }
};

// One row of x (elements `st` floats apart) as int8 for an int8_x kernel (kernels.h): each group of
// `gs` scaled so its largest magnitude is 127, with its scale and the sum of the rounded group. The
// biases must meet that rounded sum, not x's exact one: a bias is mostly an offset of the weights'
// codes (a Q8_0 file's is -128 steps), and only the rounded x cancels the offset the codes carry.
void quantize_row(const float* x, int64_t st, int64_t K, int gs, int bits, int8_t* q, float* d, float* sum) {
  for (int64_t g = 0; g * gs < K; g++) {
    const float* xg = x + g * gs * st;
    float amax = 0.f;
    for (int i = 0; i < gs; i++) amax = std::max(amax, std::fabs(xg[i * st]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int total = 0;
    for (int i = 0; i < gs; i++) {
      const int v = (int)std::nearbyint(xg[i * st] * inv);
      const int64_t k = g * gs + i;
      q[bits == 4 ? (k & 1) * (K / 2) + k / 2 : k] = (int8_t)v;  // 4 bits: x[2j] meets low nibbles, x[2j+1] high
      total += v;
    }
    d[g] = amax / 127.f, sum[g] = d[g] * (float)total;
  }
}

class QuantizedMatmul : public CpuPrimitive {
 public:
  QuantizedMatmul(mx::Stream s, int gs, int bits) : CpuPrimitive(s), gs_(gs), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc(out);
    encode(in, out, [x = in[0], w = in[1], s = in[2], b = in[3], y = out.data<float>(), gs = gs_, bits = bits_]() {
      run(x, w, s, b, y, gs, bits);
    });
  }
  static void run(const mx::array& x, const mx::array& w, const mx::array& s, const mx::array& b, float* y, int gs,
                  int bits) {
    const int64_t K = x.shape(-1), N = w.shape(0), M = x.size() / K, G = K / gs;
    const KernelTable* t = g_table;
    std::vector<float> xp, xsum(M * G), xd;
    std::vector<int8_t> xq;
    auto offs = row_offsets(x);
    const char* xs = x.data<char>();
    const int64_t st = x.strides().back();
    if (t->int8_x) {
      xq.resize(M * K), xd.resize(M * G);
      for (int64_t m = 0; m < M; m++) quantize_row((const float*)(xs + offs[m]), st, K, gs, bits, &xq[m * K], &xd[m * G],
                                                   &xsum[m * G]);
    } else {
      // x, gathered row by row; for 4 bits each group's odd elements go after its even ones, the order
      // in which a group's nibbles come out of the packed bytes
      xp.resize(M * K);
      for (int64_t m = 0; m < M; m++) {
        const float* src = (const float*)(xs + offs[m]);
        float* dst = &xp[m * K];
        if (bits == 4) {
          for (int64_t g = 0; g < K; g += gs)
            for (int i = 0; i < gs / 2; i++) {
              dst[g + i] = src[(g + 2 * i) * st];
              dst[g + gs / 2 + i] = src[(g + 2 * i + 1) * st];
            }
        } else {
          for (int64_t k = 0; k < K; k++) dst[k] = src[k * st];
        }
      }
      for (int64_t r = 0; r < M * G; r++) {
        float sum = 0.f;
        for (int i = 0; i < gs; i++) sum += xp[r * gs + i];
        xsum[r] = sum;
      }
    }
    std::vector<char> kw, ks, kb;
    QmmArgs a{xp.data(), M, K, N, (const uint32_t*)dense(w, kw), dense(s, ks), dense(b, kb), scale_type(s.dtype()),
              bits, gs, xsum.data(), xq.data(), xd.data(), y};
    const int64_t weight_bytes = N * K * bits / 8;
    int tasks = 1;
    if (g_threads > 1 && weight_bytes * (M > 8 ? 4 : 1) >= kParallelBytes) tasks = (int)std::min<int64_t>(N / 16, g_threads * 3);
    if (tasks <= 1) {
      t->qmm(&a, 0, N);
      return;
    }
    const int64_t chunk = ((N + tasks - 1) / tasks + 7) / 8 * 8;
    tasks = (int)((N + chunk - 1) / chunk);
    pool().run(tasks, [&](int i) { t->qmm(&a, i * chunk, std::min(N, (i + 1) * chunk)); });
  }
  const char* name() const override { return "ExoQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const QuantizedMatmul&>(o);
    return gs_ == p.gs_ && bits_ == p.bits_;
  }

 private:
  int gs_, bits_;
};

// act(gate) * up from one matrix product's output [..., 2I] whose first half is the gate: the gated
// MLP's middle in one op, where MLX takes a split, the activation's few ops and a product.
class Gated : public CpuPrimitive {
 public:
  Gated(mx::Stream s, int act) : CpuPrimitive(s), act_(act) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc(out);
    encode(in, out, [x = in[0], y = out.data<float>(), act = act_]() {
      const int64_t I = x.shape(-1) / 2, rows = x.size() / (2 * I);
      std::vector<char> keep;
      const float* xp = (const float*)dense(x, keep);
      auto run_rows = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) g_table->gated_row(xp + r * 2 * I, xp + r * 2 * I + I, y + r * I, I, act);
      };
      const int tasks = g_threads > 1 && rows * I >= (64 << 10) ? (int)std::min<int64_t>(rows, g_threads) : 1;
      if (tasks <= 1) {
        run_rows(0, rows);
        return;
      }
      const int64_t per = (rows + tasks - 1) / tasks;
      pool().run(tasks, [&](int t) { run_rows(t * per, std::min(rows, (t + 1) * per)); });
    });
  }
  const char* name() const override { return "ExoGated"; }
  bool is_equivalent(const mx::Primitive& o) const override { return act_ == static_cast<const Gated&>(o).act_; }

 private:
  int act_;
};

class RMSNorm : public CpuPrimitive {
 public:
  RMSNorm(mx::Stream s, float eps) : CpuPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc(out);
    encode(in, out, [x = in[0], w = in[1], y = out.data<float>(), eps = eps_]() {
      const int64_t D = x.shape(-1), rows = x.size() / D;
      std::vector<char> kw, row;
      const float* wp = (const float*)dense(w, kw);
      auto offs = row_offsets(x);
      const int64_t st = x.strides().back();
      row.resize(st == 1 ? 0 : D * 4);
      for (int64_t r = 0; r < rows; r++) {
        const float* src = (const float*)(x.data<char>() + offs[r]);
        if (st != 1) {
          for (int64_t d = 0; d < D; d++) ((float*)row.data())[d] = src[d * st];
          src = (const float*)row.data();
        }
        g_table->rms_norm_row(src, wp, y + r * D, D, eps);
      }
    });
  }
  const char* name() const override { return "ExoRMSNorm"; }
  bool is_equivalent(const mx::Primitive& o) const override { return eps_ == static_cast<const RMSNorm&>(o).eps_; }

 private:
  float eps_;
};

class RoPE : public CpuPrimitive {
 public:
  // With `periods` (float32 [dims / 2], the last input), frequency i is 1 / periods[i] instead of
  // base^(-2i / dims): rescaled frequencies, as Llama 3's. Positions start at `offsets[0]`, or at an
  // array's value (`array_offset`); with one offset per batch row (a batch of sequences, each at its
  // own position), row b's start at `offsets[b]`.
  RoPE(mx::Stream s, int dims, bool traditional, float base, float scale, std::vector<int> offsets, bool array_offset,
       bool periods)
      : CpuPrimitive(s), dims_(dims), trad_(traditional), base_(base), scale_(scale), offsets_(std::move(offsets)),
        array_offset_(array_offset), periods_(periods) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc(out);
    mx::array off = array_offset_ ? in[1] : in[0];
    mx::array per = periods_ ? in.back() : in[0];
    encode(in, out, [x = in[0], off, per, y = out.data<float>(), dims = dims_, trad = trad_, base = base_,
                     scale = scale_, offsets = offsets_, array_offset = array_offset_, periods = periods_]() {
      std::vector<int64_t> starts(offsets.begin(), offsets.end());
      if (array_offset) {
        auto t = off.dtype();
        if (t == mx::int32) starts[0] = *off.data<int32_t>();
        else if (t == mx::int64) starts[0] = *off.data<int64_t>();
        else if (t == mx::uint32) starts[0] = *off.data<uint32_t>();
        else starts[0] = (int64_t)*off.data<float>();
      }
      const int nd = x.ndim();
      const int64_t D = x.shape(-1), L = x.shape(nd - 2), rows = x.size() / D, half = dims / 2;
      const int64_t per_start = rows / (int64_t)starts.size();  // rows that share a start
      const float lb = std::log(base) / (float)half;
      std::vector<float> inv(half);
      for (int64_t i = 0; i < half; i++)
        inv[i] = periods ? 1.0f / per.data<float>()[i * per.strides()[0]] : std::exp(-(float)i * lb);
      // cos and sin per position and frequency, in float32 as mx.fast.rope computes them
      std::vector<float> cs(L * half), sn(L * half);
      auto table = [&](int64_t start) {
        for (int64_t l = 0; l < L; l++) {
          const float pos = (float)(start + l) * scale;
          for (int64_t i = 0; i < half; i++) {
            const float th = pos * inv[i];
            cs[l * half + i] = std::cos(th);
            sn[l * half + i] = std::sin(th);
          }
        }
      };
      auto offs = row_offsets(x);
      const int64_t st = x.strides().back();
      std::vector<float> row(st == 1 ? 0 : D);
      for (int64_t r = 0; r < rows; r++) {
        if (r % per_start == 0) table(starts[r / per_start]);
        const float* src = (const float*)(x.data<char>() + offs[r]);
        if (st != 1) {
          for (int64_t d = 0; d < D; d++) row[d] = src[d * st];
          src = row.data();
        }
        const int64_t l = r % L;
        float* dst = y + r * D;
        g_table->rope_row(src, dst, &cs[l * half], &sn[l * half], half, trad);
        if (dims < D) std::memcpy(dst + dims, src + dims, (D - dims) * 4);
      }
    });
  }
  const char* name() const override { return "ExoRoPE"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const RoPE&>(o);
    return dims_ == p.dims_ && trad_ == p.trad_ && base_ == p.base_ && scale_ == p.scale_ && offsets_ == p.offsets_ &&
           array_offset_ == p.array_offset_ && periods_ == p.periods_;
  }

 private:
  int dims_;
  bool trad_;
  float base_, scale_;
  std::vector<int> offsets_;
  bool array_offset_, periods_;
};

// A cache's write goes into its own buffer where that is dense (the output shares it), else into a new
// one (`share_or_alloc` says true), which `copy_into` must fill with the cache before the write.
bool share_or_alloc(const mx::array& cache, mx::array& out) {
  const bool copy = !(cache.flags().row_contiguous && cache.data_size() == cache.size());
  if (copy) alloc(out);
  else out.copy_shared_buffer(cache);
  return copy;
}

void copy_into(const mx::array& cache, char* y) {
  std::vector<char> keep;
  const void* src = dense(cache, keep);
  if (src != y) std::memcpy(y, src, cache.nbytes());
}

class CacheAppend : public CpuPrimitive {
 public:
  CacheAppend(mx::Stream s, int offset) : CpuPrimitive(s), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array& cache = in[0];
    const bool copy = share_or_alloc(cache, out);
    encode(in, out, [cache, nw = in[1], y = out.data<char>(), copy, offset = offset_]() {
      const int64_t es = cache.itemsize();
      if (copy) copy_into(cache, y);
      const int nd = nw.ndim();
      const int64_t D = nw.shape(-1), L = nw.shape(nd - 2), cap = cache.shape(nd - 2), rows = nw.size() / D;
      auto offs = row_offsets(nw);
      const int64_t st = nw.strides().back() * es;
      const char* src = nw.data<char>();
      for (int64_t r = 0; r < rows; r++) {  // row r of `new` is position r % L of head r / L
        char* dst = y + (((r / L) * cap) + offset + r % L) * D * es;
        if (st == es) std::memcpy(dst, src + offs[r], D * es);
        else
          for (int64_t d = 0; d < D; d++) std::memcpy(dst + d * es, src + offs[r] + d * st, es);
      }
    });
  }
  const char* name() const override { return "ExoCacheAppend"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    return offset_ == static_cast<const CacheAppend&>(o).offset_;
  }

 private:
  int offset_;
};

// Causal attention of L query rows per head over the first `length` positions of a [B, Hkv, capacity, D]
// cache, grouped-query: row i sits at position length - L + i and sees the positions up to it (the last
// `window` of them where window > 0). One row at a time through the table's attn_head, rows and heads
// shared out over the pool round-robin, so every task gets early (short) and late (long) rows alike.
// `row(r, scratch)` computes row r; `bytes` is what all the rows read.
template <class Row>
void attention_rows(int64_t rows, int64_t bytes, int64_t scratch_floats, Row&& row) {
  int tasks = (g_threads > 1 && bytes >= (256 << 10)) ? (int)std::min<int64_t>(rows, g_threads) : 1;
  if (tasks <= 1) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t r = 0; r < rows; r++) row(r, scratch);
    return;
  }
  pool().run(tasks, [&](int t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t r = t; r < rows; r += tasks) row(r, scratch);
  });
}

class Attention : public CpuPrimitive {
 public:
  Attention(mx::Stream s, int length, float scale, int window)
      : CpuPrimitive(s), length_(length), scale_(scale), window_(window) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc(out);
    encode(in, out, [q = in[0], k = in[1], v = in[2], y = out.data<float>(), T = length_, scale = scale_,
                     window = window_]() {
      const int64_t B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3), Hkv = k.shape(1),
                    cap = k.shape(2);
      const int half = k.dtype() == mx::float16;
      std::vector<char> kq, kk, kv;
      const float* qp = (const float*)dense(q, kq);
      // keys and values need only a unit stride along D; otherwise a dense copy
      auto kv_base = [&](const mx::array& a, std::vector<char>& keep, int64_t& st0, int64_t& st1, int64_t& stt) {
        if (a.strides().back() == 1) {
          st0 = a.strides()[0], st1 = a.strides()[1], stt = a.strides()[2];
          return (const char*)a.data<char>();
        }
        st0 = Hkv * cap * D, st1 = cap * D, stt = D;
        return (const char*)dense(a, keep);
      };
      int64_t k0, k1, kt, v0, v1, vt;
      const char* kp = kv_base(k, kk, k0, k1, kt);
      const char* vp = kv_base(v, kv, v0, v1, vt);
      const int64_t rows = B * Hq * L, group = Hq / Hkv, es = k.itemsize();
      attention_rows(rows, B * Hkv * T * D * 2 * es * L, T + D, [&](int64_t r, std::vector<float>& scratch) {
        const int64_t i = r % L, h = (r / L) % Hq, b = r / (L * Hq), hk = h / group;  // r = (b * Hq + h) * L + i
        const int64_t end = T - L + i + 1, begin = window > 0 && end > window ? end - window : 0;
        AttnArgs a{qp + r * D, kp + (b * k0 + hk * k1 + begin * kt) * es, vp + (b * v0 + hk * v1 + begin * vt) * es,
                   end - begin, D, kt, vt, half, scale, scratch.data(), scratch.data() + T, y + r * D};
        g_table->attn_head(&a);
      });
    });
  }
  const char* name() const override { return "ExoAttention"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const Attention&>(o);
    return length_ == p.length_ && scale_ == p.scale_ && window_ == p.window_;
  }

 private:
  int length_;
  float scale_;
  int window_;
};

// A decode step of a batch of sequences, each with caches of its own: row b's new key and value
// ([B, Hkv, 1, D]) written at `offsets[b]` of its caches (in place, as CacheAppend), then its query
// attending over its `offsets[b] + 1` positions, each row as Attention computes it alone. One graph
// node for the batch, where a node per sequence and step cost more than the attention itself.
// Inputs: q, k, v, then each sequence's keys and values [1, Hkv, capacity, D]; outputs: the attention
// [B, Hq, 1, D], then each sequence's keys and values after the write.
class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream s, std::vector<int> offsets, float scale, int window)
      : mx::Primitive(s), offsets_(std::move(offsets)), scale_(scale), window_(window) {}
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("exo kernels run on the CPU only");
  }
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    const int64_t B = (int64_t)offsets_.size();
    alloc(outs[0]);
    std::vector<bool> copied(2 * B);
    for (int64_t c = 0; c < 2 * B; c++) copied[c] = share_or_alloc(in[3 + c], outs[1 + c]);
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    for (auto& a : outs) enc.set_output_array(a);
    enc.dispatch([in, outs, copied, offsets = offsets_, scale = scale_, window = window_]() mutable {
      const mx::array &q = in[0], &k = in[1], &v = in[2];
      const int64_t B = (int64_t)offsets.size(), Hq = q.shape(1), D = q.shape(3), Hkv = k.shape(1),
                    group = Hq / Hkv, es = in[3].itemsize();
      const int half = in[3].dtype() == mx::float16;
      std::vector<char> kq, kk, kv;
      const float* qp = (const float*)dense(q, kq);
      const char* kn = (const char*)dense(k, kk);
      const char* vn = (const char*)dense(v, kv);
      int64_t read = 0;
      for (int64_t c = 0; c < 2 * B; c++) {
        const mx::array& cache = in[3 + c];
        char* y = outs[1 + c].data<char>();
        if (copied[c]) copy_into(cache, y);
        const int64_t b = c / 2, cap = cache.shape(2);
        const char* nw = (c % 2 ? vn : kn) + b * Hkv * D * es;
        for (int64_t h = 0; h < Hkv; h++) std::memcpy(y + (h * cap + offsets[b]) * D * es, nw + h * D * es, D * es);
        read += Hkv * (offsets[b] + 1) * D * es;
      }
      int64_t longest = 0;
      for (int o : offsets) longest = std::max<int64_t>(longest, o + 1);
      float* y = outs[0].data<float>();
      attention_rows(B * Hq, read, longest + D, [&](int64_t r, std::vector<float>& scratch) {
        const int64_t b = r / Hq, hk = (r % Hq) / group, T = offsets[b] + 1, cap = in[3 + 2 * b].shape(2);
        const int64_t begin = window > 0 && T > window ? T - window : 0;
        const char* kp = outs[1 + 2 * b].data<char>() + (hk * cap + begin) * D * es;
        const char* vp = outs[2 + 2 * b].data<char>() + (hk * cap + begin) * D * es;
        AttnArgs a{qp + r * D, kp, vp, T - begin, D, D, D, half, scale, scratch.data(), scratch.data() + T, y + r * D};
        g_table->attn_head(&a);
      });
    });
  }
  const char* name() const override { return "ExoDecodeAttention"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const DecodeAttention&>(o);
    return offsets_ == p.offsets_ && scale_ == p.scale_ && window_ == p.window_;
  }

 private:
  std::vector<int> offsets_;
  float scale_;
  int window_;
};

void need(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < a.ndim(); i++) s << (i ? ", " : "") << a.shape(i);
  s << ")";
  return s.str();
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                           int group_size, int bits) {
  need(bits == 4 || bits == 8, "quantized_matmul: bits must be 4 or 8");
  need(group_size == 32 || group_size == 64 || group_size == 128, "quantized_matmul: group_size must be 32, 64 or 128");
  need(x.dtype() == mx::float32 && x.ndim() >= 1, "quantized_matmul: x must be a float32 array");
  need(w.dtype() == mx::uint32 && w.ndim() == 2, "quantized_matmul: w must be uint32 [N, K * bits / 32]");
  const int64_t K = x.shape(-1), N = w.shape(0);
  need(w.shape(1) * 32 / bits == K && K % group_size == 0,
       "quantized_matmul: x " + shape_str(x) + " does not match w " + shape_str(w));
  need(scales.ndim() == 2 && scales.shape(0) == N && scales.shape(1) == K / group_size && scales.shape() == biases.shape() &&
           scales.dtype() == biases.dtype(),
       "quantized_matmul: scales and biases must be [N, K / group_size]");
  scale_type(scales.dtype());
  auto shape = x.shape();
  shape.back() = (int)N;
  return mx::array(shape, mx::float32, std::make_shared<QuantizedMatmul>(mx::to_stream({}), group_size, bits),
                   {x, w, scales, biases});
}

mx::array gated(const mx::array& x, int act) {
  need(x.dtype() == mx::float32 && x.ndim() >= 1 && x.shape(-1) % 2 == 0, "gated: x must be float32 [..., 2I]");
  need(act == 0 || act == 1, "gated: activation must be 0 (silu) or 1 (gelu, tanh approximation)");
  auto shape = x.shape();
  shape.back() /= 2;
  return mx::array(shape, mx::float32, std::make_shared<Gated>(mx::to_stream({}), act), {x});
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  need(x.dtype() == mx::float32 && weight.dtype() == mx::float32, "rms_norm: x and weight must be float32");
  need(x.ndim() >= 1 && weight.ndim() == 1 && weight.shape(0) == x.shape(-1),
       "rms_norm: weight " + shape_str(weight) + " does not match x " + shape_str(x));
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(mx::to_stream({}), eps), {x, weight});
}

mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, std::vector<int> offsets,
               const std::vector<mx::array>& array_offset, const std::vector<mx::array>& periods) {
  need(x.dtype() == mx::float32 && x.ndim() >= 2, "rope: x must be float32 [..., L, D]");
  need(offsets.size() == 1 || (int64_t)offsets.size() == x.shape(0), "rope: one offset, or one per batch row");
  need(array_offset.empty() || offsets.size() == 1, "rope: an array offset is one offset");
  need(dims > 0 && dims % 2 == 0 && dims <= x.shape(-1), "rope: dims must be even and at most D");
  std::vector<mx::array> inputs{x};
  if (!array_offset.empty()) {
    need(array_offset[0].size() == 1, "rope: an array offset must be a scalar");
    inputs.push_back(array_offset[0]);
  }
  if (!periods.empty()) {
    need(periods[0].dtype() == mx::float32 && periods[0].ndim() == 1 && periods[0].size() == (size_t)dims / 2,
         "rope: periods must be float32 [dims / 2]");
    inputs.push_back(periods[0]);
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RoPE>(mx::to_stream({}), dims, traditional, base, scale, std::move(offsets),
                                          !array_offset.empty(), !periods.empty()),
                   inputs);
}

mx::array cache_append(const mx::array& cache, const mx::array& nw, int offset) {
  need(cache.ndim() == 4 && nw.ndim() == 4, "cache_append: cache and new must be [B, H, positions, D]");
  need(cache.dtype() == nw.dtype(), "cache_append: cache and new must have the same dtype");
  need(cache.shape(0) == nw.shape(0) && cache.shape(1) == nw.shape(1) && cache.shape(3) == nw.shape(3),
       "cache_append: new " + shape_str(nw) + " does not match cache " + shape_str(cache));
  need(offset >= 0 && offset + nw.shape(2) <= cache.shape(2),
       "cache_append: positions [" + std::to_string(offset) + ", " + std::to_string(offset + nw.shape(2)) +
           ") do not fit a cache of " + std::to_string(cache.shape(2)));
  return mx::array(cache.shape(), cache.dtype(), std::make_shared<CacheAppend>(mx::to_stream({}), offset), {cache, nw});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, int length, float scale, int window) {
  need(q.dtype() == mx::float32 && (k.dtype() == mx::float32 || k.dtype() == mx::float16) && v.dtype() == k.dtype(),
       "attention: q must be float32, keys and values both float32 or both float16");
  need(q.ndim() == 4 && k.ndim() == 4 && k.shape() == v.shape() && q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3) &&
           q.shape(1) % k.shape(1) == 0,
       "attention: q " + shape_str(q) + " must be [B, Hq, L, D] against keys [B, Hkv, capacity, D]");
  need(length >= q.shape(2) && length <= k.shape(2), "attention: length must be in [L, capacity]");
  need(window >= 0, "attention: window must be 0 (none) or positive");
  return mx::array(q.shape(), mx::float32, std::make_shared<Attention>(mx::to_stream({}), length, scale, window),
                   {q, k, v});
}

std::vector<mx::array> decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                        const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                                        std::vector<int> offsets, float scale, int window) {
  const int64_t B = (int64_t)offsets.size();
  need(q.dtype() == mx::float32 && q.ndim() == 4 && q.shape(0) == B && q.shape(2) == 1,
       "decode_attention: q must be float32 [B, Hq, 1, D], B the number of offsets");
  need(k.ndim() == 4 && k.shape() == v.shape() && k.shape(0) == B && k.shape(2) == 1 && k.shape(3) == q.shape(3) &&
           q.shape(1) % k.shape(1) == 0,
       "decode_attention: k and v must be [B, Hkv, 1, D] for q " + shape_str(q));
  need((int64_t)keys.size() == B && (int64_t)values.size() == B, "decode_attention: one cache per offset");
  need(window >= 0, "decode_attention: window must be 0 (none) or positive");
  std::vector<mx::array> inputs{q, k, v};
  std::vector<mx::Shape> shapes{q.shape()};
  std::vector<mx::Dtype> dtypes{mx::float32};
  for (int64_t b = 0; b < B; b++) {
    for (const mx::array* c : {&keys[b], &values[b]}) {
      need(c->dtype() == k.dtype() && (c->dtype() == mx::float32 || c->dtype() == mx::float16) && c->ndim() == 4 &&
               c->shape(0) == 1 && c->shape(1) == k.shape(1) && c->shape(3) == k.shape(3),
           "decode_attention: caches must be [1, Hkv, capacity, D] of k's dtype (float32 or float16)");
      need(offsets[b] >= 0 && offsets[b] < c->shape(2), "decode_attention: an offset past its cache's capacity");
      inputs.push_back(*c);
      shapes.push_back(c->shape());
      dtypes.push_back(c->dtype());
    }
  }
  return mx::array::make_arrays(std::move(shapes), dtypes,
                                std::make_shared<DecodeAttention>(mx::to_stream({}), std::move(offsets), scale, window),
                                inputs);
}

std::vector<std::string> supported_paths() {
  std::vector<std::string> p;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    if (__builtin_cpu_supports("avx512vnni")) p.push_back("avx512vnni");
    p.push_back("avx512");
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) p.push_back("avx2");
#endif
  p.push_back("portable");  // elsewhere (aarch64) the one path: the same loops, vectorized for the target
  return p;
}

void select_path(const std::string& path, int threads) {
  bool ok = false;
  for (auto& p : supported_paths()) ok |= p == path;
  need(ok, "this CPU cannot run the '" + path + "' kernels");
  g_table = path == "avx512vnni" ? &kAvx512Vnni : path == "avx512" ? &kAvx512 : path == "avx2" ? &kAvx2 : &kPortable;
  g_threads = threads < 1 ? 1 : threads;
}

}  // namespace
}  // namespace exo_kernels

NB_MODULE(_native, m) {
  using namespace exo_kernels;
  pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." + std::to_string(MLX_VERSION_PATCH);
  m.def("supported_paths", &supported_paths, "The kernel paths this CPU can run, fastest first.");
  m.def("select", &select_path, "path"_a, "threads"_a, "Use kernel path `path` with `threads` threads.");
  m.def("path", [] { return std::string(g_table->name); });
  m.def("quantized_matmul", &quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a);
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("gated", &gated, "x"_a, "activation"_a);
  m.def("rope", &rope, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a, "array_offset"_a,
        "periods"_a);
  m.def("cache_append", &cache_append, "cache"_a, "new"_a, "offset"_a);
  m.def("attention", &attention, "q"_a, "keys"_a, "values"_a, "length"_a, "scale"_a, "window"_a);
  m.def("decode_attention", &decode_attention, "q"_a, "k"_a, "v"_a, "keys"_a, "values"_a, "offsets"_a, "scale"_a,
        "window"_a);
}
