// One sweep of causal / masked softmax attention on the CPU that returns, beside the output, each row's log-sum-exp,
// entropy and top-k keys, each row's mass on given key features (key sets), and each key's received attention.
//
// The sweep runs over blocks of BQ query rows. For a block it scores the whole visible key range at once
// (S_blk = scale · Q_blk Kᵀ, one BLAS gemm into a per-thread buffer of BQ × S floats), so every row's softmax is
// exact in two passes over its scores (max, then exp and sums) rather than online; the normalised weights are then
// available to add into each key's received attention in the same sweep, and O_blk = P_blk V (a second gemm). No
// T × S matrix is ever held: the buffer is BQ × S per thread.
//
// Conventions (those of headlab_kernels.head_stats): query head h reads kv head h / (Hq / Hkv); causal means query i
// sees keys j <= i + S - Q; `mask` is bool [Bm, Hm, Q, S] (True = may attend; Bm, Hm broadcast by stride 0). A row
// that sees no key gets output 0, lse = NEG (the wrapper makes it -inf), entropy 0, no top-k keys (index -1).
// Compiled with -ffast-math: masked scores hold the finite sentinel NEG, never -inf.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>

namespace {

constexpr float NEG = -1.0e30f;
constexpr int64_t CHUNK = 64;  // keys per chunk of the top-k scan

// The BLAS torch links (MKL in the x86 wheels) through its Fortran entry point, as ATen's own cpublas::gemm does;
// column-major: C (m x n) = alpha op(A) op(B) + beta C.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(std::max<int64_t>(lda, 1)), ib = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ic = static_cast<int>(std::max<int64_t>(ldc, 1));
  sgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

struct Strides {
  int64_t b, h, t;
};

Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

}  // namespace

std::vector<at::Tensor> attention_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const c10::optional<at::Tensor>& mask_opt, bool causal, double scale_d,
                                        bool want_entropy, int64_t topk, const c10::optional<at::Tensor>& feats_opt,
                                        bool want_received, const c10::optional<at::Tensor>& qmask_opt,
                                        int64_t block_q) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [B, H, T, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k, v must be float32");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v need a contiguous last dim");
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t G = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(1) == G && v.size(2) == S && H % G == 0,
              "k / v do not fit q");
  TORCH_CHECK(!causal || S >= Q, "causal attention needs S >= Q");
  const int64_t rep = H / G;
  const float scale = static_cast<float>(scale_d);
  const int64_t BQ = std::max<int64_t>(1, block_q);

  const bool has_mask = mask_opt.has_value() && mask_opt->defined();
  at::Tensor mask;
  if (has_mask) {
    mask = *mask_opt;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(2) == Q && mask.size(3) == S &&
                    mask.stride(3) == 1,
                "mask must be bool [Bm, Hm, Q, S] with a contiguous last dim");
  }
  const bool has_feats = feats_opt.has_value() && feats_opt->defined();
  at::Tensor feats;  // [B, S, K] float32: per-key features averaged under each row's weights (key-set indicators)
  int64_t K = 0;
  if (has_feats) {
    feats = feats_opt->contiguous();
    TORCH_CHECK(feats.scalar_type() == at::kFloat && feats.dim() == 3 && feats.size(0) == B && feats.size(1) == S,
                "features must be float32 [B, S, K]");
    K = feats.size(2);
  }
  const bool has_qmask = qmask_opt.has_value() && qmask_opt->defined();
  at::Tensor qmask;
  if (has_qmask) {
    qmask = qmask_opt->contiguous();
    TORCH_CHECK(qmask.scalar_type() == at::kBool && qmask.dim() == 2 && qmask.size(0) == B && qmask.size(1) == Q,
                "query mask must be bool [B, Q]");
  }

  auto fopt = q.options();
  at::Tensor out = at::empty({B, Q, H, Dv}, fopt);  // the layout the model's attention returns
  at::Tensor lse = at::empty({B, H, Q}, fopt);
  at::Tensor ent = want_entropy ? at::empty({B, H, Q}, fopt) : at::empty({0}, fopt);
  at::Tensor tk_idx = at::empty({B, H, Q, topk}, fopt.dtype(at::kLong));
  at::Tensor tk_w = at::empty({B, H, Q, topk}, fopt);
  at::Tensor setm = at::empty({B, H, Q, K}, fopt);
  const int nthreads = at::get_num_threads();
  // per-thread received accumulators, summed at the end
  at::Tensor rcv_t = want_received ? at::zeros({nthreads, B, H, S}, fopt) : at::empty({0}, fopt);

  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = has_mask ? mask.data_ptr<bool>() : nullptr;
  const int64_t mb = has_mask ? (mask.size(0) == 1 ? 0 : mask.stride(0)) : 0;
  const int64_t mh = has_mask ? (mask.size(1) == 1 ? 0 : mask.stride(1)) : 0;
  const int64_t mt = has_mask ? mask.stride(2) : 0;
  const float* fp = has_feats ? feats.data_ptr<float>() : nullptr;
  const bool* qmp = has_qmask ? qmask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  float* ep = want_entropy ? ent.data_ptr<float>() : nullptr;
  int64_t* tip = tk_idx.data_ptr<int64_t>();
  float* twp = tk_w.data_ptr<float>();
  float* smp = setm.data_ptr<float>();
  float* rp = want_received ? rcv_t.data_ptr<float>() : nullptr;

  const int64_t nblocks = (Q + BQ - 1) / BQ;
  const int64_t nwork = B * H * nblocks;
  const int64_t off = S - Q;  // causal: row i sees keys j <= i + off
  std::vector<std::vector<float>> scratch(nthreads);

  // With a mask, each block of queries scores only the key range its rows may see, [lo, hi): padding on the left,
  // a sliding window and causality stay out of the gemms. Found once per (mask batch row, mask head, block).
  const int64_t mbn = has_mask ? mask.size(0) : 0, mhn = has_mask ? mask.size(1) : 0;
  std::vector<int64_t> range_lo(mbn * mhn * nblocks), range_hi(mbn * mhn * nblocks);
  if (has_mask) {
    at::parallel_for(0, mbn * mhn * nblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t blk = w % nblocks, bh = w / nblocks, bm = bh / mhn, hm = bh % mhn;
        const int64_t i0 = blk * BQ, i1 = std::min(Q, i0 + BQ);
        int64_t lo = S, hi = 0;
        for (int64_t i = i0; i < i1; ++i) {
          const bool* mrow = mp + bm * mask.stride(0) + hm * mask.stride(1) + i * mt;
          const int64_t lim = causal ? std::min(S, i + off + 1) : S;
          int64_t j = 0;
          while (j < std::min(lim, lo) && !mrow[j]) ++j;
          if (j < lim) lo = std::min(lo, j);
          int64_t e = lim;  // the last visible key, scanned 8 mask bytes at a time
          while (e - 8 >= hi) {
            uint64_t word;
            std::memcpy(&word, mrow + e - 8, 8);
            if (word) break;
            e -= 8;
          }
          while (e > hi && !mrow[e - 1]) --e;
          hi = std::max(hi, e);
        }
        range_lo[w] = lo;
        range_hi[w] = hi;
      }
    });
  }

  at::parallel_for(0, nwork, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    std::vector<float>& buf = scratch[tid];
    if (buf.size() < static_cast<size_t>(BQ * S)) buf.resize(BQ * S);
    float* sbuf = buf.data();
    std::vector<float> row_m(BQ), row_inv(BQ), row_a(BQ);
    std::vector<float> best_v(std::max<int64_t>(topk, 1));
    std::vector<int64_t> best_i(std::max<int64_t>(topk, 1));
    std::vector<float> chunk_max(topk > 0 ? (S + CHUNK - 1) / CHUNK : 0);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t bh = w / nblocks, r = w % nblocks;
      // alternate cheap and costly blocks so that any contiguous range of work is balanced under causality
      const int64_t blk = (r % 2 == 0) ? r / 2 : nblocks - 1 - r / 2;
      const int64_t b = bh / H, h = bh % H, g = h / rep;
      const int64_t i0 = blk * BQ, i1 = std::min(Q, i0 + BQ), nr = i1 - i0;
      int64_t kbeg = 0, kend = causal ? std::min(S, i1 + off) : S;  // the keys any row of the block may see
      if (has_mask) {
        const int64_t at = ((mb ? b : 0) * mhn + (mh ? h : 0)) * nblocks + blk;
        kbeg = range_lo[at];
        kend = std::min(kend, range_hi[at]);
      }
      const int64_t W = std::max<int64_t>(kend - kbeg, 0);
      const float* qb = qp + b * sq.b + h * sq.h + i0 * sq.t;
      const float* kb = kp + b * sk.b + g * sk.h + kbeg * sk.t;
      const float* vb = vp + b * sv.b + g * sv.h + kbeg * sv.t;
      if (W > 0) {
        // S_blk^T (W x nr, column-major) = K (W x D) . Q_blk^T: row r of sbuf holds row i0 + r's scores
        gemm(true, false, W, nr, D, scale, kb, sk.t, qb, sq.t, 0.0f, sbuf, W);
      }
      float* rcv = want_received ? rp + ((static_cast<int64_t>(tid) * B + b) * H + h) * S + kbeg : nullptr;
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t i = i0 + rr;
        float* s = sbuf + rr * W;
        // keys [kbeg, kbeg + lim) before the mask; s[j] is key kbeg + j
        const int64_t lim = std::max<int64_t>(0, (causal ? std::min(kend, i + off + 1) : kend) - kbeg);
        for (int64_t j = lim; j < W; ++j) s[j] = NEG;
        if (has_mask) {
          const bool* mrow = mp + b * mb + h * mh + i * mt + kbeg;
          for (int64_t j = 0; j < lim; ++j) s[j] = mrow[j] ? s[j] : NEG;
        }
        float m = NEG;
        if (topk > 0) {  // per-chunk maxima, so that the top-k scan skips the chunks that cannot hold a top key
          for (int64_t c = 0; c * CHUNK < lim; ++c) {
            float cm = NEG;
            const int64_t j1 = std::min(lim, (c + 1) * CHUNK);
            for (int64_t j = c * CHUNK; j < j1; ++j) cm = std::max(cm, s[j]);
            chunk_max[c] = cm;
            m = std::max(m, cm);
          }
        } else {
          for (int64_t j = 0; j < lim; ++j) m = std::max(m, s[j]);
        }
        const int64_t row = (b * H + h) * Q + i;
        if (!(m > 0.5f * NEG)) {  // sees no key
          std::fill(s, s + W, 0.0f);
          row_m[rr] = NEG;
          row_inv[rr] = 0.0f;
          row_a[rr] = 0.0f;
          continue;
        }
        if (topk > 0) {
          int64_t n = 0;
          for (int64_t c = 0; c * CHUNK < lim; ++c) {
            if (chunk_max[c] <= 0.5f * NEG || (n == topk && chunk_max[c] <= best_v[n - 1])) continue;
            const int64_t j1 = std::min(lim, (c + 1) * CHUNK);
            for (int64_t j = c * CHUNK; j < j1; ++j) {
              const float x = s[j];
              if (x <= 0.5f * NEG || (n == topk && x <= best_v[n - 1])) continue;
              int64_t p = (n < topk) ? n++ : n - 1;
              while (p > 0 && best_v[p - 1] < x) {  // ties keep the lower key first
                best_v[p] = best_v[p - 1];
                best_i[p] = best_i[p - 1];
                --p;
              }
              best_v[p] = x;
              best_i[p] = kbeg + j;
            }
          }
          for (int64_t t = 0; t < topk; ++t) {
            tip[row * topk + t] = t < n ? best_i[t] : -1;
            twp[row * topk + t] = t < n ? best_v[t] : NEG;  // scores; weights once the lse is known
          }
        }
        float l = 0.0f, a = 0.0f;
        if (want_entropy) {
          for (int64_t j = 0; j < W; ++j) {
            const float x = s[j];
            const float p = std::exp(x - m);
            s[j] = p;
            l += p;
            a += p * (x - m);
          }
        } else {
          for (int64_t j = 0; j < W; ++j) {
            const float p = std::exp(s[j] - m);
            s[j] = p;
            l += p;
          }
        }
        row_m[rr] = m + std::log(l);
        row_inv[rr] = 1.0f / l;
        row_a[rr] = a / l + m;  // sum_j p_ij s_ij
        if (want_received && (!has_qmask || qmp[b * Q + i])) {
          const float inv = row_inv[rr];
          for (int64_t j = 0; j < W; ++j) {
            const float p = s[j] * inv;
            s[j] = p;
            rcv[j] += p;
          }
          row_inv[rr] = 1.0f;  // s now holds normalised weights
        }
      }
      // O_blk^T (Dv x nr) = V^T (Dv x W) . P^T (W x nr), written straight into out [B, Q, H, Dv]
      float* ob = op + ((b * Q + i0) * H + h) * Dv;
      float* smb = smp + ((b * H + h) * Q + i0) * K;
      if (W > 0) {
        gemm(false, false, Dv, nr, W, 1.0f, vb, sv.t, sbuf, W, 0.0f, ob, H * Dv);
        if (K > 0) gemm(false, false, K, nr, W, 1.0f, fp + (b * S + kbeg) * K, K, sbuf, W, 0.0f, smb, K);
      } else {  // no row of the block sees a key
        for (int64_t rr = 0; rr < nr; ++rr) {
          std::fill(ob + rr * H * Dv, ob + rr * H * Dv + Dv, 0.0f);
          row_m[rr] = NEG;
          row_inv[rr] = 0.0f;
          row_a[rr] = 0.0f;
        }
        std::fill(smb, smb + nr * K, 0.0f);
      }
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t i = i0 + rr, row = (b * H + h) * Q + i;
        const float inv = row_inv[rr];
        if (inv != 1.0f) {
          float* o = ob + rr * H * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
          for (int64_t c = 0; c < K; ++c) smb[rr * K + c] *= inv;
        }
        const float ls = row_m[rr];
        lp[row] = ls;
        const bool seen = ls > 0.5f * NEG;
        if (want_entropy) ep[row] = seen ? std::max(0.0f, ls - row_a[rr]) : 0.0f;
        for (int64_t t = 0; t < topk; ++t) {
          float& wt = twp[row * topk + t];
          wt = (seen && tip[row * topk + t] >= 0) ? std::exp(wt - ls) : 0.0f;
          if (!seen) tip[row * topk + t] = -1;
        }
      }
    }
  });

  at::Tensor received = want_received ? rcv_t.sum(0) : at::empty({0}, fopt);
  return {out, lse, ent, tk_idx, tk_w, setm, received};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_stats", &attention_stats,
        "softmax attention with its lse, entropy, top-k, key-feature masses and received attention in one sweep");
}
