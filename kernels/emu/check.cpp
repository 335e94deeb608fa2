// Runs the CUDA kernels under the SIMT emulator (simt.h) against naive double-precision references:
// decode attention (single pass and split-K + reduce), prefill attention, fused add + RMSNorm and
// masked mean pooling, in f32 and f16, with GQA, shuffled block tables, partially filled blocks,
// NaN in every unused cache slot and NaN-poisoned outputs. Exit status 0 = all within bounds.
// Built and run by scripts/check-kernels.sh (g++ -std=c++20 -I<cuda include>).
#include "simt.h"

#include "../src/cuda/norm.cu"
#include "../src/cuda/paged_attention.cu"
#include "../src/cuda/pooling.cu"
#include "../src/cuda/prefill_attention.cu"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>

static std::mt19937 rng{std::random_device{}()};
static int failures = 0;

template <typename T> T to_t(float v) { return gf::from_float<T>(v); }
template <typename T> float from_t(T v) { return gf::to_float(v); }
template <typename T> const char* tname() { return sizeof(T) == 4 ? "f32" : "f16"; }

template <typename T> std::vector<T> random_t(size_t n, float amp) {
  std::uniform_real_distribution<float> d(-amp, amp);
  std::vector<T> v(n);
  for (auto& x : v) x = to_t<T>(d(rng));
  return v;
}

template <typename T> void check(const std::string& what, const std::vector<T>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = from_t(got[i]);
    if (!std::isfinite(g)) {
      std::printf("FAIL %s [%s]: element %zu is %f\n", what.c_str(), tname<T>(), i, g);
      ++failures;
      return;
    }
    num += (g - want[i]) * (g - want[i]);
    den += want[i] * want[i];
  }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  const double tol = sizeof(T) == 4 ? 1e-5 : 2e-3;
  std::printf("%s %s [%s]: rel err %.2e\n", rel <= tol ? "ok  " : "FAIL", what.c_str(), tname<T>(), rel);
  if (rel > tol) ++failures;
}

struct Paged {
  std::vector<uint32_t> tables;  // [seqs, max_blocks]
  int max_blocks = 0, num_blocks = 0;
};

// Fills K/V for every position < ctx[s] through a shuffled table; all other slots NaN.
template <typename T>
Paged make_paged(const std::vector<int>& ctx, int bs, int row, std::vector<T>& kc, std::vector<T>& vc) {
  Paged p;
  for (int c : ctx) p.max_blocks = std::max(p.max_blocks, (c + bs - 1) / bs);
  int needed = 0;
  for (int c : ctx) needed += (c + bs - 1) / bs;
  p.num_blocks = needed + 2;
  std::vector<uint32_t> ids(p.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  p.tables.assign(ctx.size() * p.max_blocks, 0);
  kc.assign(size_t(p.num_blocks) * bs * row, to_t<T>(NAN));
  vc = kc;
  size_t next = 0;
  for (size_t s = 0; s < ctx.size(); ++s) {
    for (int b = 0; b < (ctx[s] + bs - 1) / bs; ++b) p.tables[s * p.max_blocks + b] = ids[next++];
    for (int pos = 0; pos < ctx[s]; ++pos) {
      const size_t slot = size_t(p.tables[s * p.max_blocks + pos / bs]) * bs + pos % bs;
      auto k = random_t<T>(row, 1.f), v = random_t<T>(row, 1.f);
      std::copy(k.begin(), k.end(), kc.begin() + slot * row);
      std::copy(v.begin(), v.end(), vc.begin() + slot * row);
    }
  }
  return p;
}

// Naive causal attention of query row `qrow` (at position qpos) over positions 0..=qpos.
template <typename T>
void naive(std::vector<double>& out, size_t out_off, const std::vector<T>& q, size_t q_off, const std::vector<T>& kc,
           const std::vector<T>& vc, const uint32_t* table, int qpos, int bs, int nkv, int kvh, int hd, float scale) {
  std::vector<double> s(qpos + 1);
  double mx = -INFINITY;
  for (int p = 0; p <= qpos; ++p) {
    const size_t base = ((size_t(table[p / bs]) * bs + p % bs) * nkv + kvh) * hd;
    double dot = 0;
    for (int d = 0; d < hd; ++d) dot += double(from_t(q[q_off + d])) * from_t(kc[base + d]);
    s[p] = dot * scale;
    mx = std::max(mx, s[p]);
  }
  double z = 0;
  for (auto& x : s) z += (x = std::exp(x - mx));
  for (int d = 0; d < hd; ++d) {
    double acc = 0;
    for (int p = 0; p <= qpos; ++p) acc += s[p] * from_t(vc[((size_t(table[p / bs]) * bs + p % bs) * nkv + kvh) * hd + d]);
    out[out_off + d] = acc / z;
  }
}

template <typename T, int HD> void check_decode(std::vector<int> ctx, int nh, int nkv, int bs, int part) {
  std::vector<T> kc, vc;
  const Paged p = make_paged<T>(ctx, bs, nkv * HD, kc, vc);
  const int seqs = int(ctx.size());
  const auto q = random_t<T>(size_t(seqs) * nh * HD, 1.f);
  const float scale = 1.f / std::sqrt(float(HD));
  std::vector<double> want(q.size());
  for (int s = 0; s < seqs; ++s)
    for (int h = 0; h < nh; ++h)
      naive(want, (size_t(s) * nh + h) * HD, q, (size_t(s) * nh + h) * HD, kc, vc, &p.tables[s * p.max_blocks],
            ctx[s] - 1, bs, nkv, h / (nh / nkv), HD, scale);
  std::vector<uint32_t> lens(ctx.begin(), ctx.end());
  const std::string shape = "hd" + std::to_string(HD) + " ctx[0]=" + std::to_string(ctx[0]) + " seqs " + std::to_string(seqs);

  std::vector<T> out(q.size(), to_t<T>(NAN));
  emu_launch({unsigned(nh), unsigned(seqs), 1}, gf::DECODE_THREADS, [&] {
    gf::paged_attention_decode_impl<T, HD, false>(out.data(), nullptr, nullptr, nullptr, q.data(), kc.data(), vc.data(),
                                                  p.tables.data(), lens.data(), nkv, scale, p.max_blocks, bs, 0);
  });
  check("decode v1 " + shape, out, want);

  const int max_ctx = *std::max_element(ctx.begin(), ctx.end());
  const int parts = (max_ctx + part - 1) / part;
  std::vector<float> tmp(size_t(seqs) * nh * parts * HD, NAN), ml(size_t(seqs) * nh * parts, NAN), es(ml);
  std::fill(out.begin(), out.end(), to_t<T>(NAN));
  emu_launch({unsigned(nh), unsigned(seqs), unsigned(parts)}, gf::DECODE_THREADS, [&] {
    gf::paged_attention_decode_impl<T, HD, true>(nullptr, tmp.data(), ml.data(), es.data(), q.data(), kc.data(), vc.data(),
                                                 p.tables.data(), lens.data(), nkv, scale, p.max_blocks, bs, part);
  });
  emu_launch({unsigned(nh), unsigned(seqs), 1}, 128, [&] {
    gf::paged_attention_reduce_impl<T>(out.data(), tmp.data(), ml.data(), es.data(), lens.data(), HD, part, parts);
  });
  check("decode v2 partition " + std::to_string(part) + " " + shape, out, want);
}

template <typename T, int HD> void check_prefill(std::vector<std::pair<int, int>> seqs, int nh, int nkv, int bs) {
  std::vector<int> ctx;
  std::vector<uint32_t> lens, cu{0};
  int max_q = 0;
  for (auto [c, ql] : seqs) {
    ctx.push_back(c);
    lens.push_back(c);
    cu.push_back(cu.back() + ql);
    max_q = std::max(max_q, ql);
  }
  std::vector<T> kc, vc;
  const Paged p = make_paged<T>(ctx, bs, nkv * HD, kc, vc);
  const auto q = random_t<T>(size_t(cu.back()) * nh * HD, 1.f);
  const float scale = 1.f / std::sqrt(float(HD));
  std::vector<double> want(q.size());
  for (size_t s = 0; s < seqs.size(); ++s)
    for (int i = 0; i < seqs[s].second; ++i)
      for (int h = 0; h < nh; ++h) {
        const size_t off = ((cu[s] + i) * size_t(nh) + h) * HD;
        naive(want, off, q, off, kc, vc, &p.tables[s * p.max_blocks], ctx[s] - seqs[s].second + i, bs, nkv,
              h / (nh / nkv), HD, scale);
      }
  std::vector<T> out(q.size(), to_t<T>(NAN));
  constexpr int BM = gf::PREFILL_WARPS * gf::PrefillRows<T>::value;
  emu_launch({unsigned((max_q + BM - 1) / BM), unsigned(nh), unsigned(seqs.size())}, gf::PREFILL_WARPS * 32, [&] {
    gf::prefill_impl<T, HD>(out.data(), q.data(), kc.data(), vc.data(), p.tables.data(), lens.data(), cu.data(), nkv, scale,
                            p.max_blocks, bs);
  });
  check("prefill hd" + std::to_string(HD) + " seqs " + std::to_string(seqs.size()) + " first (" +
            std::to_string(seqs[0].first) + "," + std::to_string(seqs[0].second) + ")",
        out, want);
}

template <typename T> void check_norm_pool() {
  const int rows = 3, hidden = 577;
  auto x = random_t<T>(rows * hidden, 2.f), res = random_t<T>(rows * hidden, 2.f), w = random_t<T>(hidden, 1.f);
  std::vector<double> want(x.size());
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    std::vector<double> sum(hidden);
    for (int i = 0; i < hidden; ++i) {
      sum[i] = double(from_t(x[r * hidden + i])) + from_t(res[r * hidden + i]);
      ss += sum[i] * sum[i];
    }
    const double inv = 1.0 / std::sqrt(ss / hidden + 1e-5);
    for (int i = 0; i < hidden; ++i) want[r * hidden + i] = sum[i] * inv * from_t(w[i]);
  }
  emu_launch({rows, 1, 1}, 256, [&] { gf::fused_add_rms_norm_impl<T>(x.data(), res.data(), w.data(), 1e-5f, hidden); });
  check("fused_add_rms_norm", x, want);

  const int batch = 3, seq = 9, hs = 300;
  const auto h = random_t<T>(batch * seq * hs, 1.f);
  std::vector<uint32_t> mask(batch * seq, 0);
  for (int b = 0; b < batch; ++b) std::fill(mask.begin() + b * seq, mask.begin() + b * seq + 1 + b * 3, 1u);
  std::vector<double> pw(batch * hs);
  for (int b = 0; b < batch; ++b) {
    double nn = 0;
    const int cnt = 1 + b * 3;
    for (int d = 0; d < hs; ++d) {
      double s = 0;
      for (int t = 0; t < cnt; ++t) s += from_t(h[(b * seq + t) * hs + d]);
      pw[b * hs + d] = s / cnt;
      nn += pw[b * hs + d] * pw[b * hs + d];
    }
    for (int d = 0; d < hs; ++d) pw[b * hs + d] /= std::sqrt(nn);
  }
  std::vector<float> pooled(batch * hs, NAN);
  emu_launch({batch, 1, 1}, 256, [&] { gf::mean_pool_impl<T>(pooled.data(), h.data(), mask.data(), seq, hs, 1); });
  check<float>(std::string("mean_pool from ") + tname<T>(), pooled, pw);
}

template <typename T> void run_all() {
  check_decode<T, 64>({1, 17, 100, 33}, 9, 3, 16, 64);
  check_decode<T, 128>({300, 5, 129}, 4, 2, 16, 128);
  check_decode<T, 64>({64, 7, 1, 200, 31}, 3, 1, 8, 32);
  check_prefill<T, 64>({{1, 1}, {37, 37}, {100, 20}, {16, 16}}, 9, 3, 16);
  check_prefill<T, 128>({{90, 90}, {77, 1}, {129, 65}}, 4, 2, 16);
  check_norm_pool<T>();
}

int main() {
  run_all<float>();
  run_all<__half>();
  std::printf(failures ? "emulated kernel checks: %d FAILED\n" : "emulated kernel checks: all passed\n", failures);
  return failures ? 1 : 0;
}
