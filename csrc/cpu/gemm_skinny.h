// The float GEMM for skinny M (tens to a few hundred rows of x against a large weight),
// where blocked_gemm's order costs more than the product: it packs a whole
// KB x NC panel of B (up to 24 MB) into memory before computing, so at small M every
// weight element is written to L3 and read back for a handful of multiply-adds.
//
// Here the roles turn around. All of A (the M rows of x, a few MB at most) is packed
// once per call, shared by the threads. Each task owns a few B slivers (NR columns
// each) and, per KC block, packs (or dequantizes) them into its own L1/L2 buffer right
// before the micro-kernel sweeps every A sliver past them. The C tile of a task (M x a
// few slivers) stays in L2 across the KC blocks. Each weight element is read from
// memory once, packed once and used by all M rows while still in L1.
//
// Same micro-kernels and KC blocks as blocked_gemm, and each C element is summed over
// the KC blocks in order: the result is bit-identical to blocked_gemm's and does not
// depend on the thread count.
#pragma once

#include <cstdlib>
#include <type_traits>
#include <utility>

#include "cpu/gemm_blocked.h"

namespace fastkern {
namespace cpu {
namespace gemm {

// Largest M that takes skinny_gemm; blocked_gemm above. Measured (2 threads, 4096x4096
// fp32, AVX2 and AVX-512): skinny against blocked at M = 128 / 256 24 / 46 ms against
// 28 / 53 (AVX2), 15 vs 20 at 128 (AVX-512); a tie or a loss from M = 512, where the
// packed A (M x K) no longer stays near the cores. FASTKERN_SKINNY_MAX_M overrides it
// (read per call, so tests reach both drivers).
constexpr int64_t kSkinnyMaxM = 256;

inline int64_t skinny_max_m() {
  const char* e = std::getenv("FASTKERN_SKINNY_MAX_M");
  return e ? std::atoll(e) : kSkinnyMaxM;
}

// Columns of B per task: 64 (4 AVX2 slivers, 2 AVX-512 ones). Their packed KC block
// (64 x KC x 4 = 48 KB at KC 192) stays in L2 while each sliver in turn sits in L1.
constexpr int64_t kSkinnyCols = 64;

// A B packer may also offer prefetch(row0, rows, k0, kc): the source bytes of the next
// KC block of the task's slivers are requested while the current one computes, so
// that the packing that follows finds them in cache (dozens of short row runs, too
// many streams for the hardware prefetchers).
template <class P, class = void>
struct has_prefetch : std::false_type {};
template <class P>
struct has_prefetch<P, std::void_t<decltype(std::declval<const P&>().prefetch(int64_t(), 0, int64_t(), int64_t()))>>
    : std::true_type {};

// Lines [off, off + len) of `rows` rows `ld` bytes apart, into L2.
inline void prefetch_rows(const void* base, int64_t ld, int rows, int64_t off, int64_t len) {
#if FASTKERN_X86
  const char* p = static_cast<const char*>(base) + off;
  for (int r = 0; r < rows; ++r, p += ld)
    for (int64_t b = 0; b < len; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
#else
  (void)base, (void)ld, (void)rows, (void)off, (void)len;
#endif
}

// Unit-stride rows of T (StridedRows with s_k == 1) that also prefetch.
template <class T>
struct PrefetchRows : StridedRows<T> {
  void prefetch(int64_t row0, int rows, int64_t k0, int64_t kc) const {
    prefetch_rows(this->p + row0 * this->s_row, this->s_row * int64_t(sizeof(T)), rows, k0 * int64_t(sizeof(T)),
                  kc * int64_t(sizeof(T)));
  }
};

template <class PackA, class PackB>
void skinny_gemm(int64_t M, int64_t N, int64_t K, const MicroKernel& uk, const PackA& pack_a, const PackB& pack_b,
                 float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const int MR = uk.mr, NR = uk.nr;
  const int64_t na = div_up(M, MR), mp = na * MR;
  const int64_t nq = div_up(K, kKC);
  // Packed A: KC block q at Ap + q * KC * mp, its sliver s at + s * kc * MR.
  at::Tensor abuf = at::empty({mp * K + 16}, at::kFloat);
  float* Ap = abuf.data_ptr<float>();
  auto a_block = [&](int64_t q) { return Ap + q * kKC * mp; };
  parallel_for_dynamic(0, nq * na, grain_for(nq * na, int64_t(MR) * kKC * 64), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t q = t / na, s = t % na;
      const int64_t pc = q * kKC, kc = std::min(kKC, K - pc);
      pack_a(s * MR, static_cast<int>(std::min<int64_t>(MR, M - s * MR)), pc, kc, MR, a_block(q) + s * kc * MR);
    }
  });

  const int64_t J = std::max<int64_t>(1, kSkinnyCols / NR);
  const int64_t nsl = div_up(N, NR), ntask = div_up(nsl, J);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bbuf_len = J * kKC * NR + 16;
  at::Tensor bbufs = at::empty({nthreads * bbuf_len}, at::kFloat);
  parallel_for_dynamic(0, ntask, grain_for(ntask, M * J * NR * K), [&](int64_t b, int64_t e) {
    float* Bp = bbufs.data_ptr<float>() + at::get_thread_num() * bbuf_len;
    for (int64_t t = b; t < e; ++t) {
      const int64_t s0 = t * J, s1 = std::min(nsl, s0 + J);
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t pc = q * kKC, kc = std::min(kKC, K - pc);
        for (int64_t s = s0; s < s1; ++s)
          pack_b(s * NR, static_cast<int>(std::min<int64_t>(NR, N - s * NR)), pc, kc, NR, Bp + (s - s0) * kc * NR);
        if constexpr (has_prefetch<PackB>::value) {
          if (q + 1 < nq)
            pack_b.prefetch(s0 * NR, static_cast<int>(std::min(N, s1 * NR) - s0 * NR), pc + kc,
                            std::min(kKC, K - pc - kc));
        }
        const float* ab = a_block(q);
        for (int64_t s = s0; s < s1; ++s) {
          const int nn = static_cast<int>(std::min<int64_t>(NR, N - s * NR));
          const float* bp = Bp + (s - s0) * kc * NR;
          for (int64_t ir = 0; ir < na; ++ir) {
            const int mm = static_cast<int>(std::min<int64_t>(MR, M - ir * MR));
            float* c = C + ir * MR * ldc + s * NR;
            // The tile the next call works on, for the kernel to prefetch.
            const float* next = ir + 1 < na ? c + MR * ldc : s + 1 < s1 ? C + (s + 1) * NR : C + s0 * NR;
            uk.fn(kc, ab + ir * kc * MR, bp, c, ldc, mm, nn, q > 0, next);
          }
        }
      }
    }
  });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace fastkern
