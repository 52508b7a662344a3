// Scratch memory for the temporaries of an op call (quantized and packed activations,
// product buffers), kept by each thread from one call to the next.
//
// Buffers from kScratchHugeBytes on are 2 MiB aligned and advised as transparent huge pages
// (Linux): kernels that read such a buffer at scattered places (block-sparse x slices) stop
// missing the TLB on most of their reads (the 90%-sparse 4096 x 11008 M = 256 product:
// 26.4 -> 22.5 ms).
//
// A fresh allocation of a few MB is mapped by the kernel one zeroed 4 KiB page at a time
// on first touch and unmapped again when it is freed, on every call: linear_w8a8 at
// M = 4096, 384 x 384 took ~4400 page faults per call (perf stat), more time than its
// arithmetic. A Scratch takes the calling thread's buffer for its slot instead, which
// stays mapped; each thread keeps a slot's buffer up to kScratchKeepBytes (what a thread
// holds on to is bounded by that times the slots it has used: in practice the quantized and
// the packed x of the largest call, a task's products on the worker threads), and a larger
// request (or a slot already in use on the thread) gets its own buffer, freed with the
// Scratch. The contents are undefined: callers write what they read.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkern {
namespace cpu {

// Slots: taken by the calling thread before a parallel region (XQuant, XPack, Small, Scale,
// Out: products shared by the threads), or by each thread inside one (Worker0, Worker1).
enum class ScratchSlot : int { XQuant = 0, XPack, Small, Scale, Out, Worker0, Worker1, kCount };

constexpr size_t kScratchKeepBytes = size_t(32) << 20;
constexpr size_t kScratchAlign = 64;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kScratchHugeBytes = size_t(4) << 20;

class Scratch {
 public:
  Scratch(ScratchSlot slot, size_t bytes) {
    bytes = (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    if (bytes == 0) bytes = kScratchAlign;
    Buf& b = bufs()[static_cast<int>(slot)];
    if (bytes <= kScratchKeepBytes && !b.busy) {
      if (b.cap < bytes) {
        std::free(b.p);
        b.p = nullptr;
        b.cap = 0;
        b.p = alloc(bytes);
        b.cap = bytes;
      }
      b.busy = true;
      shared_ = &b;
      p_ = b.p;
    } else {
      own_ = alloc(bytes);
      p_ = own_;
    }
  }
  ~Scratch() {
    if (shared_) shared_->busy = false;
    std::free(own_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  struct Buf {
    void* p = nullptr;
    size_t cap = 0;
    bool busy = false;
  };
  struct Bufs {
    Buf b[static_cast<int>(ScratchSlot::kCount)];
    ~Bufs() {
      for (Buf& x : b) std::free(x.p);
    }
    Buf& operator[](int i) { return b[i]; }
  };
  static Bufs& bufs() {
    static thread_local Bufs t;
    return t;
  }
  static void* alloc(size_t bytes) {
    const bool huge = bytes >= kScratchHugeBytes;
    const size_t align = huge ? kHugePage : kScratchAlign;
    if (huge) bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(align, bytes);
    TORCH_CHECK(p != nullptr, "fastkern: out of memory allocating ", bytes, " bytes of scratch");
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }

  void* p_ = nullptr;
  void* own_ = nullptr;
  Buf* shared_ = nullptr;
};

}  // namespace cpu
}  // namespace fastkern
