// A SIMT emulator for the torch-free CUDA kernels (kernels/*.cuh), so that
// they run on a machine without a GPU with their real launch shapes:
//
// - simt::launch(grid, block, body) runs gridDim x blockDim threads. Blocks
//   run one after another; the threads of a block are fibers (ucontext) on
//   this OS thread, switched only at synchronisation points, in a fixed order
//   (forward, reverse or a seeded shuffle: see Schedule), so a run is
//   reproducible and a failure repeats.
// - Warps are 32 consecutive threads. __shfl*_sync, __ballot_sync,
//   __any/__all_sync and __syncwarp are collectives of exactly the lanes of
//   their mask: a lane calling with a mask that leaves itself out, lanes of
//   one collective calling with different (overlapping) masks, a shuffle
//   reading a lane outside the mask, and a lane of the mask that never
//   arrives (it exited, or waits elsewhere) are errors.
// - __syncthreads is a barrier of the block: threads reaching different
//   __syncthreads lines, or some threads exiting while others wait, is an
//   error (a divergent barrier), as is any deadlock.
// - Shared memory (ENGRAM_SHARED in a kernel, simt::SharedArray here) checks
//   every access: two threads touching one element between two barriers,
//   one of them writing, is a race. (A __syncwarp orders its lanes' accesses.)
// - Atomics are read-modify-writes that cannot tear (one OS thread); each
//   atomic and __threadfence* is also a point where the scheduler switches
//   threads, so reporters racing on one atomicCAS interleave.
//
// Any error throws simt::Error from launch(), after every fiber of the block
// has been unwound. Not modelled: global-memory races, memory-model
// reordering, warp-synchronous code without *_sync (every thread runs
// independently, as under Volta's independent thread scheduling).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define ENGRAM_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ENGRAM_SIMT_ASAN 1
#endif
#endif
#if defined(ENGRAM_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define ENGRAM_SIMT_EMULATOR 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

namespace simt {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT: like dim3
  uint64_t count() const { return uint64_t(x) * y * z; }
};

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { kForward, kReverse, kShuffled };

constexpr int kWarpSize = 32;

namespace detail {

// Thrown inside a fiber to unwind it when the block is aborted.
struct Cancelled {};

enum class State { kRunnable, kCollective, kBarrier, kDone };
enum class Op { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  Dim3 thread_idx;
  unsigned linear = 0;  // linear thread index in the block
  State state = State::kRunnable;
  // collective in flight
  Op op = Op::kSyncwarp;
  unsigned mask = 0;
  uint64_t value = 0;
  int lane_arg = 0, width = kWarpSize;
  uint64_t result = 0;
  const char* barrier_site = nullptr;
  int barrier_line = 0;
  uint64_t warp_generation = 0;  // collectives this lane completed with its warp (race detector)
#if defined(ENGRAM_SIMT_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct Block {
  Dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;
  uint64_t epoch = 0;  // barrier count, unique across blocks and launches
  std::string error;
  bool cancelling = false;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
};

struct Runtime {
  Block* block = nullptr;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  uint64_t next_epoch = 1;
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  std::vector<char*> stacks;
#if defined(ENGRAM_SIMT_ASAN)
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
  static constexpr size_t kStackBytes = 512 * 1024;
#else
  static constexpr size_t kStackBytes = 128 * 1024;
#endif
  ~Runtime() {
    for (char* s : stacks) delete[] s;
  }
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

// Outside a launch, the built-ins read as one thread of one block.
inline const Dim3& thread_idx() {
  static const Dim3 zero{0, 0, 0};
  return rt().current ? rt().current->thread_idx : zero;
}
inline const Dim3& block_idx() {
  static const Dim3 zero{0, 0, 0};
  return rt().block ? rt().block->block_idx : zero;
}
inline const Dim3& block_dim() {
  static const Dim3 one{1, 1, 1};
  return rt().block ? rt().block->block : one;
}
inline const Dim3& grid_dim() {
  static const Dim3 one{1, 1, 1};
  return rt().block ? rt().block->grid : one;
}

[[noreturn]] inline void fail(const std::string& what) {
  Block* b = rt().block;
  std::ostringstream msg;
  msg << "simt: block (" << b->block_idx.x << "," << b->block_idx.y << "," << b->block_idx.z << ")";
  if (Fiber* f = rt().current) {
    msg << " thread (" << f->thread_idx.x << "," << f->thread_idx.y << "," << f->thread_idx.z << ") warp "
        << f->linear / kWarpSize << " lane " << f->linear % kWarpSize;
  }
  msg << ": " << what;
  if (b->error.empty()) b->error = msg.str();
  throw Cancelled{};
}

// Switch from the current fiber to the scheduler and back.
inline void switch_to_scheduler() {
  Runtime& r = rt();
  Fiber* f = r.current;
#if defined(ENGRAM_SIMT_ASAN)
  __sanitizer_start_switch_fiber(&f->fake_stack, r.scheduler_bottom, r.scheduler_size);
#endif
  swapcontext(&f->context, &r.scheduler);
#if defined(ENGRAM_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
  if (r.block->cancelling) throw Cancelled{};
}

inline void yield() {
  if (rt().current) switch_to_scheduler();
}

inline void fiber_entry() {
  Runtime& r = rt();
#if defined(ENGRAM_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_bottom, &r.scheduler_size);
#endif
  Fiber* f = r.current;
  try {
    if (!r.block->cancelling) r.block->body(r.block->body_ctx);
  } catch (const Cancelled&) {
  } catch (const std::exception& e) {
    if (r.block->error.empty()) r.block->error = std::string("simt: exception in a thread: ") + e.what();
  }
  f->state = State::kDone;
#if defined(ENGRAM_SIMT_ASAN)
  __sanitizer_start_switch_fiber(nullptr, r.scheduler_bottom, r.scheduler_size);
#endif
  setcontext(&r.scheduler);
}

inline void resume(Fiber& f) {
  Runtime& r = rt();
  r.current = &f;
#if defined(ENGRAM_SIMT_ASAN)
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, f.stack, Runtime::kStackBytes);
#endif
  swapcontext(&r.scheduler, &f.context);
#if defined(ENGRAM_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, nullptr, nullptr);
#endif
  r.current = nullptr;
}

inline std::string hex(unsigned m) {
  std::ostringstream s;
  s << "0x" << std::hex << m;
  return s.str();
}

// The lanes [first, first + 32) of warp w that exist in the block.
inline unsigned warp_lanes(const Block& b, unsigned warp) {
  const unsigned n = static_cast<unsigned>(b.fibers.size()), first = warp * kWarpSize;
  const unsigned count = std::min<unsigned>(kWarpSize, n - first);
  return count == 32 ? 0xffffffffu : ((1u << count) - 1);
}

// Completes the collective of `mask` in warp `warp` if every lane has arrived.
inline void try_complete(Block& b, unsigned warp, unsigned mask) {
  Fiber* lanes = &b.fibers[warp * kWarpSize];
  const unsigned live = warp_lanes(b, warp);
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (!(live >> l & 1u)) return;  // reported as a deadlock
    if (lanes[l].state != State::kCollective || lanes[l].mask != mask) return;
  }
  const Op op = lanes[__builtin_ctz(mask)].op;
  unsigned ballot = 0;
  bool any = false, all = true;
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (lanes[l].op != op) {
      fail(std::string("lanes of mask ") + hex(mask) + " meet in different collectives: lane " +
           std::to_string(__builtin_ctz(mask)) + " in " + op_name(op) + ", lane " + std::to_string(l) + " in " +
           op_name(lanes[l].op));
    }
    if (lanes[l].value) ballot |= 1u << l;
    any = any || lanes[l].value;
    all = all && lanes[l].value;
  }
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = lanes[l];
    const int width = f.width;
    const int segment = static_cast<int>(l) / width * width;
    int src = static_cast<int>(l);
    switch (op) {
      case Op::kShfl: src = segment + ((f.lane_arg % width) + width) % width; break;
      case Op::kShflUp: src = static_cast<int>(l) - f.lane_arg < segment ? static_cast<int>(l) : static_cast<int>(l) - f.lane_arg; break;
      case Op::kShflDown:
        src = static_cast<int>(l) + f.lane_arg >= segment + width ? static_cast<int>(l) : static_cast<int>(l) + f.lane_arg;
        break;
      case Op::kShflXor: src = (static_cast<int>(l) ^ f.lane_arg) >= segment + width ? static_cast<int>(l) : (static_cast<int>(l) ^ f.lane_arg); break;
      default: break;
    }
    if (op == Op::kShfl || op == Op::kShflUp || op == Op::kShflDown || op == Op::kShflXor) {
      if (src < 0 || src >= kWarpSize || !(mask >> src & 1u)) {
        fail(std::string(op_name(op)) + " with mask " + hex(mask) + ": lane " + std::to_string(l) + " reads lane " +
             std::to_string(src) + ", which is not in the mask (an undefined value on a GPU)");
      }
      f.result = lanes[src].value;
    } else if (op == Op::kBallot) {
      f.result = ballot;
    } else if (op == Op::kAny) {
      f.result = any;
    } else if (op == Op::kAll) {
      f.result = all;
    }
  }
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    lanes[l].state = State::kRunnable;
    ++lanes[l].warp_generation;
  }
}

inline uint64_t collective(Op op, unsigned mask, uint64_t value, int lane_arg, int width) {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (f == nullptr) throw Error(std::string(op_name(op)) + " outside a simt::launch");
  Block& b = *r.block;
  const unsigned warp = f->linear / kWarpSize, lane = f->linear % kWarpSize;
  if (!(mask >> lane & 1u)) fail(std::string(op_name(op)) + " with mask " + hex(mask) + " that leaves out the calling lane");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail(std::string(op_name(op)) + " with width " + std::to_string(width) + " (not a power of 2 up to 32)");
  }
  const unsigned live = warp_lanes(b, warp);
  if (mask & ~live) fail(std::string(op_name(op)) + " with mask " + hex(mask) + " names lanes past the block's last thread");
  Fiber* lanes = &b.fibers[warp * kWarpSize];
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (l == lane || !(live >> l & 1u) || lanes[l].state != State::kCollective) continue;
    if (lanes[l].mask != mask && (lanes[l].mask & mask)) {
      fail(std::string(op_name(op)) + " with mask " + hex(mask) + " while lane " + std::to_string(l) + " waits in " +
           op_name(lanes[l].op) + " with mask " + hex(lanes[l].mask));
    }
  }
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->lane_arg = lane_arg;
  f->width = width;
  f->state = State::kCollective;
  try_complete(b, warp, mask);
  if (f->state == State::kCollective) switch_to_scheduler();
  return f->result;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline void syncthreads(const char* file, int line) {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (f == nullptr) throw Error("__syncthreads outside a simt::launch");
  f->barrier_site = file;
  f->barrier_line = line;
  f->state = State::kBarrier;
  switch_to_scheduler();
}

// The scheduler's decision when no thread can run: release a barrier, or fail.
inline bool release_barrier_or_fail(Block& b) {
  const Fiber* waiting = nullptr;
  const Fiber* done = nullptr;
  const Fiber* stuck = nullptr;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kBarrier) {
      if (waiting == nullptr) waiting = &f;
      if (f.barrier_line != waiting->barrier_line || std::strcmp(f.barrier_site, waiting->barrier_site) != 0) {
        b.error = "simt: divergent __syncthreads: thread " + std::to_string(waiting->linear) + " waits at " +
                  waiting->barrier_site + ":" + std::to_string(waiting->barrier_line) + ", thread " +
                  std::to_string(f.linear) + " at " + f.barrier_site + ":" + std::to_string(f.barrier_line);
        return false;
      }
    } else if (f.state == State::kDone) {
      done = &f;
    } else if (f.state == State::kCollective) {
      if (stuck == nullptr) stuck = &f;
    }
  }
  if (stuck != nullptr) {
    std::ostringstream msg;
    msg << "simt: deadlock: thread " << stuck->linear << " (warp " << stuck->linear / kWarpSize << " lane "
        << stuck->linear % kWarpSize << ") waits in " << op_name(stuck->op) << " with mask " << hex(stuck->mask)
        << " for lanes that never arrive:";
    const Fiber* lanes = &b.fibers[stuck->linear / kWarpSize * kWarpSize];
    for (unsigned l = 0; l < kWarpSize; ++l) {
      if (!(stuck->mask >> l & 1u)) continue;
      const Fiber& o = lanes[l];
      if (o.state == State::kCollective && o.mask == stuck->mask) continue;
      msg << " lane " << l << (o.state == State::kDone ? " exited" : o.state == State::kBarrier ? " is at __syncthreads" : " waits with another mask");
    }
    b.error = msg.str();
    return false;
  }
  if (waiting == nullptr) return false;  // all done
  if (done != nullptr) {
    b.error = "simt: divergent __syncthreads: thread " + std::to_string(done->linear) + " exited while thread " +
              std::to_string(waiting->linear) + " waits at " + waiting->barrier_site + ":" +
              std::to_string(waiting->barrier_line);
    return false;
  }
  b.epoch = rt().next_epoch++;
  for (Fiber& f : b.fibers) f.state = State::kRunnable;
  return true;
}

inline char* stack_for(size_t i) {
  Runtime& r = rt();
  while (r.stacks.size() <= i) r.stacks.push_back(new char[Runtime::kStackBytes]);
#if defined(ENGRAM_SIMT_ASAN)
  // A stack reused after a fiber was unwound or finished may keep poisoned
  // redzones of its old frames.
  __asan_unpoison_memory_region(r.stacks[i], Runtime::kStackBytes);
#endif
  return r.stacks[i];
}

inline void run_block(Block& b) {
  Runtime& r = rt();
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.thread_idx = Dim3{i % b.block.x, i / b.block.x % b.block.y, i / (b.block.x * b.block.y)};
    f.stack = stack_for(i);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = Runtime::kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  b.epoch = r.next_epoch++;
  for (;;) {
    bool ran = false;
    for (unsigned i : b.order) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kRunnable) continue;
      resume(f);
      ran = true;
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    if (!ran && !release_barrier_or_fail(b)) break;
  }
  if (!b.error.empty()) {
    // Unwind every fiber still alive: each throws Cancelled where it waits.
    b.cancelling = true;
    for (Fiber& f : b.fibers) {
      if (f.state != State::kDone) resume(f);
    }
  }
}

template <typename F>
void call_body(void* ctx) {
  (*static_cast<F*>(ctx))();
}

}  // namespace detail

// Thread order of the scheduler for the following launches.
inline void set_schedule(Schedule s, uint64_t seed = 0) {
  detail::rt().schedule = s;
  detail::rt().seed = seed;
}

// Runs body() in every thread of a grid x block launch. body is a callable
// that calls the kernel with its arguments (captured by value: kernel
// parameters are copies).
template <typename F>
void launch(Dim3 grid, Dim3 block, F body) {
  detail::Runtime& r = detail::rt();
  if (r.block != nullptr) throw Error("simt::launch inside a launch");
  if (block.count() == 0 || block.count() > 1024) throw Error("simt::launch: block of " + std::to_string(block.count()) + " threads");
  if (grid.count() == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw Error("simt::launch: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                std::to_string(grid.z) + ") outside CUDA's limits");
  }
  std::mt19937_64 rng(r.seed);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        detail::Block b;
        b.grid = grid;
        b.block = block;
        b.block_idx = Dim3{x, y, z};
        b.fibers.resize(block.count());
        b.order.resize(block.count());
        for (unsigned i = 0; i < b.order.size(); ++i) b.order[i] = i;
        if (r.schedule == Schedule::kReverse) std::reverse(b.order.begin(), b.order.end());
        if (r.schedule == Schedule::kShuffled) std::shuffle(b.order.begin(), b.order.end(), rng);
        b.body = &detail::call_body<F>;
        b.body_ctx = &body;
        r.block = &b;
        detail::run_block(b);
        r.block = nullptr;
        if (!b.error.empty()) throw Error(b.error);
      }
    }
  }
}

// Shared memory of a block: every element access is checked against the
// accesses of other threads since the last barrier.
template <typename T, size_t N>
class SharedArray {
  struct Access {
    uint64_t epoch = 0;  // barrier epoch of the accesses recorded
    int writer = -1;     // linear thread that wrote in the epoch, or -1
    uint64_t writer_generation = 0;
    int reader = -1;  // a thread that read in the epoch; -2: several
    uint64_t reader_generation = 0;
  };
  T data_[N];
  Access access_[N];

  static bool ordered(int other, uint64_t other_generation, const detail::Fiber& me) {
    // A completed collective of the same warp orders its lanes' accesses.
    if (other < 0 || static_cast<unsigned>(other) / kWarpSize != me.linear / kWarpSize) return false;
    return detail::rt().block->fibers[other].warp_generation > other_generation;
  }

  void check(size_t i, bool write) {
    if (i >= N) {
      detail::fail("shared array index " + std::to_string(i) + " past its " + std::to_string(N) + " elements");
    }
    detail::Fiber* me = detail::rt().current;
    if (me == nullptr) return;
    Access& a = access_[i];
    const uint64_t epoch = detail::rt().block->epoch;
    if (a.epoch != epoch) a = Access{epoch};
    const int tid = static_cast<int>(me->linear);
    if (a.writer >= 0 && a.writer != tid && !ordered(a.writer, a.writer_generation, *me)) {
      detail::fail("shared memory race on element " + std::to_string(i) + ": thread " + std::to_string(tid) + " " +
                   (write ? "writes" : "reads") + " it after thread " + std::to_string(a.writer) +
                   " wrote it, with no barrier between");
    }
    if (write) {
      if (a.reader == -2 || (a.reader >= 0 && a.reader != tid && !ordered(a.reader, a.reader_generation, *me))) {
        detail::fail("shared memory race on element " + std::to_string(i) + ": thread " + std::to_string(tid) +
                     " writes it after another thread read it, with no barrier between");
      }
      a.writer = tid;
      a.writer_generation = me->warp_generation;
    } else if (a.reader != tid) {
      a.reader = a.reader == -1 ? tid : -2;
      a.reader_generation = me->warp_generation;
    }
  }

 public:
  class Ref {
    SharedArray* s_;
    size_t i_;

   public:
    Ref(SharedArray* s, size_t i) : s_(s), i_(i) {}
    operator T() const {  // NOLINT: reads like the element
      s_->check(i_, false);
      return s_->data_[i_];
    }
    Ref& operator=(const T& v) {
      s_->check(i_, true);
      s_->data_[i_] = v;
      return *this;
    }
    Ref& operator=(const Ref& o) { return *this = static_cast<T>(o); }
    Ref& operator+=(const T& v) { return *this = static_cast<T>(*this) + v; }
  };
  Ref operator[](size_t i) { return Ref(this, i); }
};

}  // namespace simt

// The CUDA built-ins.
#define threadIdx (::simt::detail::thread_idx())
#define blockIdx (::simt::detail::block_idx())
#define blockDim (::simt::detail::block_dim())
#define gridDim (::simt::detail::grid_dim())
#define __syncthreads() ::simt::detail::syncthreads(__FILE__, __LINE__)
// Shared memory: a static per kernel instantiation (blocks run one at a time).
#define ENGRAM_SHARED(type, name, count) static ::simt::SharedArray<type, count> name

using dim3 = simt::Dim3;

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using namespace simt::detail;
  return from_bits<T>(collective(Op::kShfl, mask, to_bits(v), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace simt::detail;
  return from_bits<T>(collective(Op::kShflUp, mask, to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace simt::detail;
  return from_bits<T>(collective(Op::kShflDown, mask, to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace simt::detail;
  return from_bits<T>(collective(Op::kShflXor, mask, to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace simt::detail;
  return static_cast<unsigned>(collective(Op::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  using namespace simt::detail;
  return static_cast<int>(collective(Op::kAny, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  using namespace simt::detail;
  return static_cast<int>(collective(Op::kAll, mask, predicate != 0, 0, 32));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  using namespace simt::detail;
  if (rt().current == nullptr) return;
  // A full mask in a partial last warp means its existing lanes.
  collective(Op::kSyncwarp, mask & warp_lanes(*rt().block, rt().current->linear / simt::kWarpSize), 0, 0, 32);
}
// The warp's lanes that have not exited.
inline unsigned __activemask() {
  using namespace simt::detail;
  Runtime& r = rt();
  if (r.current == nullptr) return 1u;
  const unsigned warp = r.current->linear / simt::kWarpSize;
  unsigned m = 0;
  for (unsigned l = 0; l < simt::kWarpSize; ++l) {
    const unsigned i = warp * simt::kWarpSize + l;
    if (i < r.block->fibers.size() && r.block->fibers[i].state != State::kDone) m |= 1u << l;
  }
  return m;
}
inline void __threadfence() { simt::detail::yield(); }
inline void __threadfence_block() { simt::detail::yield(); }
inline void __threadfence_system() { simt::detail::yield(); }

inline int atomicCAS(int* address, int compare, int value) {
  simt::detail::yield();  // let another thread in first
  const int old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T>
T atomicAdd(T* address, T value) {
  simt::detail::yield();
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  simt::detail::yield();
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
inline int atomicExch(int* address, int value) {
  simt::detail::yield();
  const int old = *address;
  *address = value;
  return old;
}
