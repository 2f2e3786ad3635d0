// The CUDA emulator's scheduler: every CUDA thread of a block is a fiber (ucontext) on the
// launching OS thread, so a launch is deterministic and a wrong synchronization is seen, not raced.
//
// Scheduling: the blocks of a grid run one after another (REFT_EXT_EMU_BLOCK_ORDER = sequential,
// reverse or random[:seed]) or k at a time, interleaved (REFT_EXT_EMU_CONCURRENT_BLOCKS = k).
// Within the running blocks, a warp runs until none of its lanes can go on (all wait at a barrier,
// a warp exchange or have exited) before the next warp runs (REFT_EXT_EMU_WARP_ORDER = ascending or
// descending). Warps therefore drift as far apart as CUDA allows: a read of shared memory that a
// missing __syncthreads leaves unordered sees the 0xFF poison, not a lucky value.
//
// Checks (each a std::runtime_error naming the kernel, its launch site and the .cu line):
//   launch configuration (grid and block sizes, shared memory), __syncthreads reached by all live
//   threads at one call site, warp exchanges whose every lane named in the mask takes part at the
//   same site with the same mask, deadlocks (with the sites every thread waits at), out-of-bounds
//   writes into the canaries around every buffer the op allocated and around __shared__ storage,
//   and a launch not followed by C10_CUDA_KERNEL_LAUNCH_CHECK.
//
// Memory poisoning: while a CUDA host function runs (from its c10::cuda::CUDAGuard to the guard's
// end) CPU allocations come from PoisonAllocator: payload filled with 0xFF bytes (NaN in every
// floating dtype), bracketed by 64-byte canaries whose bytes differ per allocation.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"

#if defined(CUDA_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
// Exported by libtsan, not declared in its public header: ignore this fiber's reads and writes.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(CUDA_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuda_emu {

thread_local Coordinates coordinates;

namespace {

constexpr int kWarp = 32;
constexpr size_t kCanary = 64;              // bytes of canary before and after each buffer
constexpr size_t kSharedLimit = 48 * 1024;  // static + dynamic shared memory without opt-in
constexpr unsigned kMaxThreadsPerBlock = 1024;

[[noreturn]] void fail_host(const std::string& message) { throw std::runtime_error(message); }

// TSan: the emulator's own bookkeeping is shared by the fibers without synchronization (they are
// ordered by the emulated barriers instead), and the inline std:: code it uses may be the
// instrumented copy from a CUDA file: its memory accesses are ignored, its annotations kept.
struct IgnoreEmulatorAccesses {
#if defined(CUDA_EMU_TSAN)
  IgnoreEmulatorAccesses() { __tsan_ignore_thread_begin(); }
  ~IgnoreEmulatorAccesses() { __tsan_ignore_thread_end(); }
#endif
};

std::string site_text(const char* file, int line) {
  std::string path = file ? file : "?";
  return path + ":" + std::to_string(line);
}

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Canary bytes of allocation `serial`: no two allocations share a pattern, so a stray copy of one
// canary onto another is still seen.
void fill_canary(unsigned char* bytes, size_t n, uint64_t serial, uint64_t side) {
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t word = splitmix(serial * 4 + side + i);
    std::memcpy(bytes + i, &word, std::min<size_t>(8, n - i));
  }
}
// Offset of the first canary byte that differs, or -1.
long first_bad_canary(const unsigned char* bytes, size_t n, uint64_t serial, uint64_t side) {
  unsigned char expected[kCanary];
  fill_canary(expected, n, serial, side);
  for (size_t i = 0; i < n; ++i)
    if (bytes[i] != expected[i]) return static_cast<long>(i);
  return -1;
}

// ------------------------------------------------------------------------------------------------
// Poisoned allocations

struct Allocation {
  unsigned char* base;
  size_t bytes;
  uint64_t serial;
};

std::mutex allocation_mutex;
std::unordered_map<void*, Allocation> allocations;  // by payload pointer
uint64_t allocation_serial = 0;

void free_poisoned(void* payload) {
  unsigned char* base;
  {
    const std::lock_guard<std::mutex> lock(allocation_mutex);
    auto it = allocations.find(payload);
    if (it == allocations.end()) {
      std::fprintf(stderr, "cuda_emu: freeing an unknown buffer %p\n", payload);
      std::abort();
    }
    base = it->second.base;
    allocations.erase(it);
  }
  std::free(base);
}

struct PoisonAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t total = ((n + 2 * kCanary) + 63) / 64 * 64;
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    if (base == nullptr) throw std::bad_alloc();
    unsigned char* payload = base + kCanary;
    uint64_t serial;
    {
      const std::lock_guard<std::mutex> lock(allocation_mutex);
      serial = ++allocation_serial;
      allocations[payload] = Allocation{base, n, serial};
    }
    fill_canary(base, kCanary, serial, 0);
    fill_canary(payload + n, kCanary, serial, 1);
    std::memset(payload, 0xFF, n);
    return {payload, payload, &free_poisoned, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoisonAllocator poison_allocator;

std::string check_canaries() {
  const std::lock_guard<std::mutex> lock(allocation_mutex);
  for (const auto& [payload, a] : allocations) {
    const auto* p = static_cast<const unsigned char*>(payload);
    const long before = first_bad_canary(a.base, kCanary, a.serial, 0);
    if (before >= 0) {
      return "out-of-bounds write " + std::to_string(kCanary - before) +
             " bytes before the start of a " + std::to_string(a.bytes) +
             "-byte buffer allocated by the op (buffer #" + std::to_string(a.serial) + ")";
    }
    const long after = first_bad_canary(p + a.bytes, kCanary, a.serial, 1);
    if (after >= 0) {
      return "out-of-bounds write at byte " + std::to_string(after) + " past the end of a " +
             std::to_string(a.bytes) + "-byte buffer allocated by the op (buffer #" +
             std::to_string(a.serial) + ")";
    }
  }
  return {};
}

// ------------------------------------------------------------------------------------------------
// Context switch. On x86-64 a few instructions (callee-saved registers, MXCSR and the x87 control
// word: what the ABI keeps across a call); glibc's swapcontext also saves the signal mask with a
// system call, which made it 30x slower. Elsewhere ucontext.

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
extern "C" void cuda_emu_trampoline();
asm(R"(
.text
.globl cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch,.-cuda_emu_switch
.globl cuda_emu_trampoline
.type cuda_emu_trampoline,@function
cuda_emu_trampoline:
  call cuda_emu_fiber_entry@PLT
  ud2
.size cuda_emu_trampoline,.-cuda_emu_trampoline
)");
extern "C" void cuda_emu_fiber_entry();

// A fresh stack whose first switch "returns" into the trampoline, 16-byte aligned for its call.
void make_context(Context& c, void* stack, size_t bytes) {
  auto top = reinterpret_cast<uintptr_t>(stack) + bytes;
  top &= ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;  // padding: the return address sits at 8 mod 16, so rsp % 16 == 0 after the ret
  *--slot = 0;
  *--slot = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);
  for (int i = 0; i < 6; ++i) *--slot = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  *--slot = uint64_t(control[0]) | (uint64_t(control[1] & 0xffff) << 32);
  c.sp = slot;
}
inline void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
extern "C" void cuda_emu_fiber_entry();
void make_context(Context& c, void* stack, size_t bytes) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, &cuda_emu_fiber_entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------------------------------
// Fibers and blocks

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Stack {
  void* memory = nullptr;
  size_t bytes = 0;
};

size_t stack_bytes() {
  const char* kib = std::getenv("REFT_EXT_EMU_STACK_KIB");
  return (kib ? std::strtoul(kib, nullptr, 10) : 256) * 1024;
}

// Fiber stacks of this OS thread, reused across launches (a guard page below each). Held by
// pointer: a fiber keeps its Stack* while the pool grows for the next block.
thread_local std::vector<std::unique_ptr<Stack>> stack_pool;

Stack& pooled_stack(size_t index) {
  const size_t bytes = stack_bytes();
  while (stack_pool.size() <= index) stack_pool.push_back(std::make_unique<Stack>());
  Stack& s = *stack_pool[index];
  if (s.memory == nullptr || s.bytes != bytes) {
    if (s.memory) munmap(s.memory, s.bytes + getpagesize());
    void* m = mmap(nullptr, bytes + getpagesize(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail_host("cuda_emu: cannot map a fiber stack");
    mprotect(m, getpagesize(), PROT_NONE);
    s.memory = m;
    s.bytes = bytes;
  }
  return s;
}

struct Block;

struct Fiber {
  Context context;
  Stack* stack = nullptr;
  Block* block = nullptr;
  uint3 thread_idx{0, 0, 0};
  int linear = 0, lane = 0, warp = 0;
  State state = State::Runnable;
  // Where it waits, and what it brought.
  const char* file = nullptr;
  int line = 0;
  const char* what = nullptr;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int kind = 0, arg = 0, width = kWarp, predicate = 0;
  uint64_t generation = 0;  // of the barrier or warp exchange it waits at
  bool started = false;
  void* tsan_fiber = nullptr;
};

struct SharedBuffer {
  std::unique_ptr<unsigned char[]> memory;
  size_t bytes = 0;
  uint64_t serial = 0;
  std::string site;
  unsigned char* payload() const {
    // 64-byte canary, then the payload aligned to 64 bytes.
    return memory.get() + kCanary;
  }
};

struct Block {
  uint3 idx{0, 0, 0};
  std::vector<Fiber> fibers;
  int live = 0;
  std::map<std::pair<std::string, const std::type_info*>, SharedBuffer> shared;
  size_t shared_bytes = 0;
  SharedBuffer dynamic;
  int barrier_value = 0;
  // TSan sync objects: a barrier (warp exchange) of generation g releases and acquires slot g % 2,
  // so that a thread leaving it early and releasing again at the next one does not order its later
  // writes before the reads of threads still leaving this one. (Two sub-warp groups exchanging at
  // the same time share a warp's slot: the one case where the emulator orders more than CUDA.)
  uint64_t barrier_generation = 0;
  char barrier_sync[2] = {};
  std::vector<uint64_t> warp_generation;
  std::vector<std::array<char, 2>> warp_sync;
};

struct Launch {
  LaunchSite site;
  dim3 grid, block;
  size_t dynamic_shared = 0;
  const std::function<void()>* body = nullptr;
  Context scheduler;
  void* scheduler_tsan = nullptr;
  const void* scheduler_stack = nullptr;  // ASan: the host stack's bounds, to switch back to it
  size_t scheduler_stack_bytes = 0;
  Fiber* current = nullptr;
  bool failed = false;
  std::string error;
  uint64_t shared_serial = 0;
  std::vector<std::unique_ptr<Block>> running;
};

thread_local Launch* active = nullptr;
thread_local bool unchecked_launch = false;
thread_local LaunchSite last_launch{};

std::string hex_mask(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", mask);
  return text;
}

std::string where(const Launch& L) {
  return std::string("kernel ") + L.site.kernel + " (launched at " +
         site_text(L.site.file, L.site.line) + ")";
}

std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) + "," +
         std::to_string(b.idx.z) + ")";
}

std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.thread_idx.x) + "," + std::to_string(f.thread_idx.y) + "," +
         std::to_string(f.thread_idx.z) + ") of " + block_name(*f.block);
}

Fiber& self() {
  if (active == nullptr || active->current == nullptr) {
    std::fprintf(stderr, "cuda_emu: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *active->current;
}

void set_coordinates(const Fiber& f) {
  coordinates.thread_idx = f.thread_idx;
  coordinates.block_idx = f.block->idx;
}

// One context switch, annotated for the sanitizers: TSan learns which fiber runs next and whether
// the switch orders the two; ASan learns the stack it runs on (bottom, bytes), or that the fiber
// left for good (`leaving`).
void annotated_switch(Context& from, Context& to, void* tsan_to, bool synchronize,
                      const void* bottom, size_t bytes, bool leaving) {
#if defined(CUDA_EMU_TSAN)
  __tsan_switch_to_fiber(tsan_to, synchronize ? 0 : __tsan_switch_to_fiber_no_sync);
#else
  (void)tsan_to;
  (void)synchronize;
#endif
#if defined(CUDA_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(leaving ? nullptr : &fake, bottom, bytes);
#else
  (void)bottom;
  (void)bytes;
  (void)leaving;
#endif
  switch_context(from, to);
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// The first switch into a fiber synchronizes (TSan): the host's writes before the launch happen
// before the kernel; later switches do not, so two CUDA threads are ordered only by a barrier.
void switch_to_fiber(Launch& L, Fiber& f) {
  const bool synchronize = !f.started;
  f.started = true;
  L.current = &f;
  set_coordinates(f);
  annotated_switch(L.scheduler, f.context, f.tsan_fiber, synchronize,
                   static_cast<char*>(f.stack->memory) + getpagesize(), f.stack->bytes, false);
  L.current = nullptr;
}

// From the running fiber back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler(Fiber& f, bool synchronize) {
  Launch& L = *active;
  annotated_switch(f.context, L.scheduler, L.scheduler_tsan, synchronize, L.scheduler_stack,
                   L.scheduler_stack_bytes, f.state == State::Done);
}

// A fault seen inside a fiber: the launch stops; run_grid throws on the host stack.
[[noreturn]] void fail_in_kernel(const std::string& message) {
  Fiber& f = self();
  {
    const IgnoreEmulatorAccesses ignore;
    Launch& L = *active;
    if (!L.failed) {
      L.failed = true;
      L.error = where(L) + ": " + message;
    }
    f.state = State::Done;
  }
  yield_to_scheduler(f, true);
  std::abort();  // the scheduler never resumes a fiber of a failed launch
}

void fiber_entry();
}  // namespace
}  // namespace cuda_emu

extern "C" void cuda_emu_fiber_entry() { cuda_emu::fiber_entry(); }

namespace cuda_emu {
namespace {

void fiber_entry() {
  Launch& L = *active;
  Fiber& f = *L.current;
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &L.scheduler_stack, &L.scheduler_stack_bytes);
#endif
  try {
    (*L.body)();
  } catch (const std::exception& e) {
    fail_in_kernel(std::string("exception in ") + thread_name(f) + ": " + e.what());
  } catch (...) {
    fail_in_kernel("unknown exception in " + thread_name(f));
  }
  {
    const IgnoreEmulatorAccesses ignore;
    f.state = State::Done;
    Block& b = *f.block;
    --b.live;
    // Lanes that wait for this one at a warp exchange can never complete it.
    for (const Fiber& other : b.fibers) {
      if (other.warp == f.warp && other.state == State::AtWarp && ((other.mask >> f.lane) & 1u)) {
        fail_in_kernel("lane " + std::to_string(f.lane) + " of " + thread_name(f) +
                       " exited while lane " + std::to_string(other.lane) + " waits for it at " +
                       other.what + " (" + site_text(other.file, other.line) + ") with mask " +
                       hex_mask(other.mask));
      }
    }
  }
  yield_to_scheduler(f, true);
  std::abort();
}

// Lanes [first, last] ranges of a set, for messages.
std::string lane_list(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) s << ",";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0 && std::strcmp(a.what, b.what) == 0;
}

int source_lane(int kind, int lane, int arg, int width) {
  const int base = lane & ~(width - 1);
  switch (kind) {
    case 0:
      return base + (arg & (width - 1));
    case 1: {  // PTX shfl.bfly: a lane may read earlier segments, a later one gives its own value
      const int src = lane ^ arg;
      return src >= base + width ? lane : src;
    }
    case 2:
      return lane + arg >= base + width ? lane : lane + arg;
    case 3:
      return lane - arg < base ? lane : lane - arg;
    default:
      return lane;
  }
}

// Completes the warp exchange of `arriving` when every lane of its mask waits at it.
void try_complete_warp(Block& b, Fiber& arriving) {
  const int first = arriving.warp * kWarp;
  Fiber* lanes[kWarp] = {};
  for (int l = 0; l < kWarp; ++l) {
    if (!((arriving.mask >> l) & 1u)) continue;
    const int id = first + l;
    if (id >= static_cast<int>(b.fibers.size())) {
      fail_in_kernel(std::string(arriving.what) + " (" + site_text(arriving.file, arriving.line) +
                     ") with mask " + hex_mask(arriving.mask) + " names lane " + std::to_string(l) +
                     ", which does not exist in a block of " + std::to_string(b.fibers.size()) +
                     " threads");
    }
    Fiber& f = b.fibers[id];
    if (f.state == State::Done) {
      fail_in_kernel(std::string(arriving.what) + " (" + site_text(arriving.file, arriving.line) +
                     ") with mask " + hex_mask(arriving.mask) + " in " + thread_name(arriving) +
                     " names lane " + std::to_string(l) + ", which has exited");
    }
    if (f.state != State::AtWarp) return;  // not there yet
    lanes[l] = &f;
  }
  for (Fiber* f : lanes) {
    if (f == nullptr) continue;
    if (!same_site(*f, arriving) || f->mask != arriving.mask) {
      fail_in_kernel("warp " + std::to_string(arriving.warp) + " of " + block_name(b) + ": lane " +
                     std::to_string(arriving.lane) + " is at " + arriving.what + " (" +
                     site_text(arriving.file, arriving.line) + ", mask " + hex_mask(arriving.mask) +
                     ") while lane " + std::to_string(f->lane) + " is at " + f->what + " (" +
                     site_text(f->file, f->line) + ", mask " + hex_mask(f->mask) + ")");
    }
  }
  unsigned ballot = 0;
  for (Fiber* f : lanes)
    if (f && f->predicate) ballot |= 1u << f->lane;
  for (Fiber* f : lanes) {
    if (f == nullptr) continue;
    if (f->kind == 5) {
      f->result = ballot & f->mask;
    } else if (f->kind != 4) {
      const int src = source_lane(f->kind, f->lane, f->arg, f->width);
      if (src < 0 || src >= kWarp || lanes[src] == nullptr) {
        fail_in_kernel(std::string(f->what) + " (" + site_text(f->file, f->line) + "): lane " +
                       std::to_string(f->lane) + " reads lane " + std::to_string(src) +
                       ", which is not in the mask " + hex_mask(f->mask));
      }
      f->result = lanes[src]->value;
    }
  }
  for (Fiber* f : lanes)
    if (f) f->state = State::Runnable;
  ++b.warp_generation[arriving.warp];
}

}  // namespace

uint64_t warp_exchange(const char* file, int line, const char* what, unsigned mask, uint64_t value,
                       int kind, int arg, int width) {
  const IgnoreEmulatorAccesses ignore;
  Fiber& f = self();
  if (!((mask >> f.lane) & 1u)) {
    fail_in_kernel(std::string(what) + " (" + site_text(file, line) + ") called by lane " +
                   std::to_string(f.lane) + " of " + thread_name(f) + " with mask " +
                   hex_mask(mask) + ", which does not include the calling lane");
  }
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    fail_in_kernel(std::string(what) + " (" + site_text(file, line) + "): width " +
                   std::to_string(width) + " is not a power of two in [1, 32]");
  }
  f.file = file;
  f.line = line;
  f.what = what;
  f.mask = mask;
  f.value = value;
  f.kind = kind;
  f.arg = arg;
  f.width = width;
  f.state = State::AtWarp;
  Block& b = *f.block;
  f.generation = b.warp_generation[f.warp];
  char* sync = &b.warp_sync[f.warp][f.generation % 2];
#if defined(CUDA_EMU_TSAN)
  __tsan_release(sync);
#endif
  try_complete_warp(b, f);
  if (f.state == State::AtWarp) yield_to_scheduler(f, false);
#if defined(CUDA_EMU_TSAN)
  __tsan_acquire(sync);
#else
  (void)sync;
#endif
  return f.result;
}

unsigned warp_vote(const char* file, int line, const char* what, unsigned mask, int predicate) {
  {
    const IgnoreEmulatorAccesses ignore;
    self().predicate = predicate != 0;
  }
  return static_cast<unsigned>(warp_exchange(file, line, what, mask, 0, 5, 0, kWarp));
}

unsigned active_mask() {
  const IgnoreEmulatorAccesses ignore;
  Fiber& f = self();
  unsigned mask = 0;
  for (const Fiber& other : f.block->fibers)
    if (other.warp == f.warp && other.state != State::Done) mask |= 1u << other.lane;
  return mask;
}

int syncthreads_reduce(const char* file, int line, int predicate, int op) {
  const IgnoreEmulatorAccesses ignore;
  Fiber& f = self();
  f.file = file;
  f.line = line;
  f.what = op == 0   ? "__syncthreads_count"
           : op == 1 ? "__syncthreads_and"
           : op == 2 ? "__syncthreads_or"
                     : "__syncthreads";
  f.predicate = predicate != 0;
  f.kind = op;
  f.state = State::AtBarrier;
  f.generation = f.block->barrier_generation;
  char* sync = &f.block->barrier_sync[f.generation % 2];
#if defined(CUDA_EMU_TSAN)
  __tsan_release(sync);
#endif
  yield_to_scheduler(f, false);
#if defined(CUDA_EMU_TSAN)
  __tsan_acquire(sync);
#else
  (void)sync;
#endif
  return f.block->barrier_value;
}

void syncthreads(const char* file, int line) { (void)syncthreads_reduce(file, line, 0, 3); }

namespace {

SharedBuffer make_shared_buffer(Launch& L, Block& b, size_t bytes, const std::string& site) {
  b.shared_bytes += bytes;
  if (b.shared_bytes > kSharedLimit) {
    fail_in_kernel("the block uses " + std::to_string(b.shared_bytes) +
                   " bytes of shared memory (with " + site + "), more than the " +
                   std::to_string(kSharedLimit) + " a kernel gets without opting in");
  }
  SharedBuffer s;
  s.bytes = bytes;
  s.serial = ++L.shared_serial | (1ull << 62);
  s.site = site;
  s.memory.reset(new unsigned char[bytes + 2 * kCanary]);
  fill_canary(s.memory.get(), kCanary, s.serial, 0);
  fill_canary(s.payload() + bytes, kCanary, s.serial, 1);
  std::memset(s.payload(), 0xFF, bytes);
  return s;
}

std::string check_shared(const SharedBuffer& s) {
  if (!s.memory) return {};
  if (first_bad_canary(s.memory.get(), kCanary, s.serial, 0) >= 0 ||
      first_bad_canary(s.payload() + s.bytes, kCanary, s.serial, 1) >= 0) {
    return "out-of-bounds write around the " + std::to_string(s.bytes) + "-byte __shared__ " +
           s.site;
  }
  return {};
}

}  // namespace

void* block_shared_storage(const char* site, const std::type_info& type, size_t bytes,
                           size_t align) {
  const IgnoreEmulatorAccesses ignore;
  Fiber& f = self();
  Block& b = *f.block;
  if (align > kCanary)
    fail_in_kernel(std::string("__shared__ ") + site + " needs alignment over 64");
  auto key = std::make_pair(std::string(site), &type);
  auto it = b.shared.find(key);
  if (it == b.shared.end()) {
    it = b.shared.emplace(key, make_shared_buffer(*active, b, bytes, site)).first;
  }
  return it->second.payload();
}

void* dynamic_shared_storage(const char* site) {
  const IgnoreEmulatorAccesses ignore;
  Fiber& f = self();
  Block& b = *f.block;
  if (!b.dynamic.memory) {
    if (active->dynamic_shared == 0) {
      fail_in_kernel(std::string("extern __shared__ ") + site +
                     " used by a kernel launched with 0 bytes of dynamic shared memory");
    }
    b.dynamic = make_shared_buffer(*active, b, active->dynamic_shared, site);
  }
  return b.dynamic.payload();
}

void launch_checked(const char*, int) { unchecked_launch = false; }

namespace {

unsigned long env_number(const char* name, unsigned long fallback, unsigned long low,
                         unsigned long high) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const unsigned long value = std::strtoul(text, &end, 10);
  if (*end != '\0' || value < low || value > high) {
    fail_host(std::string(name) + " must be an integer in [" + std::to_string(low) + ", " +
              std::to_string(high) + "], got '" + text + "'");
  }
  return value;
}

std::vector<uint64_t> block_order(uint64_t count) {
  std::vector<uint64_t> order(count);
  for (uint64_t i = 0; i < count; ++i) order[i] = i;
  const char* text = std::getenv("REFT_EXT_EMU_BLOCK_ORDER");
  const std::string mode = text ? text : "sequential";
  if (mode == "sequential" || mode.empty()) return order;
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
    return order;
  }
  if (mode.rfind("random", 0) == 0) {
    uint64_t seed = 0;
    if (mode.size() > 6) {
      if (mode[6] != ':') fail_host("REFT_EXT_EMU_BLOCK_ORDER: expected random:SEED, got " + mode);
      seed = std::strtoull(mode.c_str() + 7, nullptr, 10);
    }
    std::mt19937_64 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);
    return order;
  }
  fail_host("REFT_EXT_EMU_BLOCK_ORDER must be sequential, reverse or random[:SEED], got '" + mode +
            "'");
}

bool warps_descending() {
  const char* text = std::getenv("REFT_EXT_EMU_WARP_ORDER");
  const std::string mode = text ? text : "ascending";
  if (mode == "ascending" || mode.empty()) return false;
  if (mode == "descending") return true;
  fail_host("REFT_EXT_EMU_WARP_ORDER must be ascending or descending, got '" + mode + "'");
}

std::unique_ptr<Block> start_block(Launch& L, uint64_t linear, size_t first_stack) {
  auto b = std::make_unique<Block>();
  const uint64_t gx = L.grid.x, gy = L.grid.y;
  b->idx = uint3{static_cast<unsigned>(linear % gx), static_cast<unsigned>((linear / gx) % gy),
                 static_cast<unsigned>(linear / (gx * gy))};
  const unsigned n = L.block.x * L.block.y * L.block.z;
  b->fibers.resize(n);
  b->live = static_cast<int>(n);
  b->warp_generation.assign((n + kWarp - 1) / kWarp, 0);
  b->warp_sync.resize((n + kWarp - 1) / kWarp);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = b->fibers[t];
    f.block = b.get();
    f.linear = static_cast<int>(t);
    f.lane = static_cast<int>(t % kWarp);
    f.warp = static_cast<int>(t / kWarp);
    f.thread_idx = uint3{t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y)};
    f.stack = &pooled_stack(first_stack + t);
#if defined(CUDA_EMU_ASAN)
    __asan_unpoison_memory_region(static_cast<char*>(f.stack->memory) + getpagesize(),
                                  f.stack->bytes);
#endif
    make_context(f.context, static_cast<char*>(f.stack->memory) + getpagesize(), f.stack->bytes);
#if defined(CUDA_EMU_TSAN)
    f.tsan_fiber = __tsan_create_fiber(0);
#endif
  }
  return b;
}

// TSan fibers of a failed launch are left alive: they stopped mid-kernel, possibly inside the
// emulator with its accesses ignored, which TSan refuses at a fiber's end.
void destroy_block(Block& b, bool failed) {
#if defined(CUDA_EMU_TSAN)
  if (!failed)
    for (Fiber& f : b.fibers)
      if (f.tsan_fiber) __tsan_destroy_fiber(f.tsan_fiber);
#else
  (void)b;
  (void)failed;
#endif
}

std::string describe_waits(const Block& b) {
  std::map<std::string, std::vector<int>> groups;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::Done) continue;
    std::string key = f.state == State::Runnable
                          ? std::string("running")
                          : std::string(f.what) + " (" + site_text(f.file, f.line) + ")" +
                                (f.state == State::AtWarp ? " mask " + hex_mask(f.mask) : "");
    groups[key].push_back(f.linear);
  }
  std::ostringstream s;
  bool first = true;
  for (const auto& [key, ids] : groups) {
    s << (first ? "" : "; ") << "threads " << lane_list(ids) << " wait at " << key;
    first = false;
  }
  return s.str();
}

// Releases the block's barrier when every live thread waits at it; returns whether it did.
bool release_barrier(Launch& L, Block& b) {
  const Fiber* first = nullptr;
  int count = 0, all = 1, any = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::Done) continue;
    if (f.state != State::AtBarrier) return false;
    if (first == nullptr) {
      first = &f;
    } else if (!same_site(*first, f)) {
      L.failed = true;
      L.error = where(L) + ": __syncthreads reached at different call sites in " + block_name(b) +
                ": " + describe_waits(b);
      return false;
    }
    count += f.predicate;
    all &= f.predicate;
    any |= f.predicate;
  }
  if (first == nullptr) return false;
  b.barrier_value = first->kind == 0 ? count : first->kind == 1 ? all : any;
  ++b.barrier_generation;
  for (Fiber& f : b.fibers)
    if (f.state == State::AtBarrier) f.state = State::Runnable;
  return true;
}

void check_launch_config(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_shared) {
  auto bad = [&](const std::string& why) {
    fail_host(std::string("kernel ") + site.kernel + " (launched at " +
              site_text(site.file, site.line) + "): invalid configuration: " + why);
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    bad("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
        std::to_string(grid.z) + ") has a zero dimension");
  if (block.x == 0 || block.y == 0 || block.z == 0) bad("block has a zero dimension");
  if (threads > kMaxThreadsPerBlock)
    bad(std::to_string(threads) + " threads per block, more than 1024");
  if (block.x > 1024 || block.y > 1024 || block.z > 64)
    bad("block dimension over (1024, 1024, 64)");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    bad("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
        std::to_string(grid.z) + ") over (2^31-1, 65535, 65535)");
  if (dynamic_shared > kSharedLimit)
    bad(std::to_string(dynamic_shared) + " bytes of dynamic shared memory, over 48 KiB");
}

}  // namespace

void run_grid(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_shared,
              const std::function<void()>& body) {
  const IgnoreEmulatorAccesses ignore;
  if (active != nullptr) fail_host("cuda_emu: a kernel launched from inside a kernel");
  if (unchecked_launch) {
    unchecked_launch = false;
    fail_host(std::string("kernel ") + last_launch.kernel + " launched at " +
              site_text(last_launch.file, last_launch.line) +
              " was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK() before the next launch");
  }
  check_launch_config(site, grid, block, dynamic_shared);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const std::vector<uint64_t> order = block_order(blocks);
  const unsigned long concurrent = env_number("REFT_EXT_EMU_CONCURRENT_BLOCKS", 1, 1, 64);
  const bool descending = warps_descending();
  const unsigned threads = block.x * block.y * block.z;
  const int warps = static_cast<int>((threads + kWarp - 1) / kWarp);

  Launch L;
  L.site = site;
  L.grid = grid;
  L.block = block;
  L.dynamic_shared = dynamic_shared;
  L.body = &body;
  const Coordinates saved = coordinates;
  coordinates.block_dim = block;
  coordinates.grid_dim = grid;
#if defined(CUDA_EMU_TSAN)
  L.scheduler_tsan = __tsan_get_current_fiber();
#endif
  active = &L;
  std::vector<char> slot_used(concurrent, 0);
  std::vector<size_t> slot_of;  // per running block: its stack slot
  size_t next = 0;
  auto finish = [&] {
    for (auto& b : L.running) destroy_block(*b, L.failed);
    L.running.clear();
    active = nullptr;
    coordinates = saved;
  };
  while (!L.failed && (next < order.size() || !L.running.empty())) {
    while (L.running.size() < concurrent && next < order.size()) {
      size_t slot = 0;
      while (slot_used[slot]) ++slot;
      slot_used[slot] = 1;
      L.running.push_back(start_block(L, order[next++], slot * threads));
      slot_of.push_back(slot);
    }
    if (L.failed) break;
    bool progressed = false;
    for (auto& bp : L.running) {
      Block& b = *bp;
      for (int wi = 0; wi < warps && !L.failed; ++wi) {
        const int w = descending ? warps - 1 - wi : wi;
        for (bool any = true; any && !L.failed;) {
          any = false;
          for (int l = 0; l < kWarp && !L.failed; ++l) {
            const size_t id = static_cast<size_t>(w) * kWarp + l;
            if (id >= b.fibers.size()) break;
            if (b.fibers[id].state != State::Runnable) continue;
            switch_to_fiber(L, b.fibers[id]);
            any = progressed = true;
          }
        }
      }
      if (L.failed) break;
    }
    if (L.failed) break;
    for (size_t i = 0; i < L.running.size() && !L.failed;) {
      Block& b = *L.running[i];
      if (b.live == 0) {
        std::string bad;
        for (const auto& [key, s] : b.shared)
          if (bad.empty()) bad = check_shared(s);
        if (bad.empty()) bad = check_shared(b.dynamic);
        if (!bad.empty()) {
          L.failed = true;
          L.error = where(L) + ": " + bad;
          break;
        }
        destroy_block(b, false);
        slot_used[slot_of[i]] = 0;
        slot_of.erase(slot_of.begin() + i);
        L.running.erase(L.running.begin() + i);
        progressed = true;
        continue;
      }
      if (release_barrier(L, b)) progressed = true;
      ++i;
    }
    if (!progressed && !L.failed) {
      std::string text;
      for (auto& b : L.running) {
        if (b->live == 0) continue;
        text += (text.empty() ? "" : " | ") + block_name(*b) + ": " + describe_waits(*b);
      }
      L.failed = true;
      L.error = where(L) + ": deadlock: " + text;
    }
  }
  if (L.failed) {
    const std::string error = L.error;
    finish();
    unchecked_launch = false;
    fail_host(error);
  }
  finish();
  const std::string bad = check_canaries();
  if (!bad.empty()) fail_host(where(L) + ": " + bad);
  unchecked_launch = true;
  last_launch = site;
}

// ------------------------------------------------------------------------------------------------
// Host scope of a CUDA function (c10::cuda::CUDAGuard stand-in)

namespace {
thread_local int scope_depth = 0;
thread_local c10::Allocator* previous_allocator = nullptr;
}  // namespace

void begin_device_scope() {
  const IgnoreEmulatorAccesses ignore;
  if (scope_depth++ == 0) {
    previous_allocator = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&poison_allocator, /*priority=*/255);
  }
}

void end_device_scope() {
  const IgnoreEmulatorAccesses ignore;
  if (--scope_depth == 0) {
    c10::SetCPUAllocator(previous_allocator, /*priority=*/255);
    if (unchecked_launch) {
      unchecked_launch = false;
      if (std::uncaught_exceptions() == 0) {
        fail_host(std::string("kernel ") + last_launch.kernel + " launched at " +
                  site_text(last_launch.file, last_launch.line) +
                  " was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK()");
      }
    }
  }
}

}  // namespace cuda_emu
