// Host stand-in for the parts of the CUDA runtime that custom_calls/nms_cuda.cu uses, so that its
// kernels and launch code compile unchanged with a plain C++20 compiler and run on the CPU
// (tests/cpp/nms_cuda_simulator.cc, driven by tests/test_cuda_simulation.py). Test code only: it is
// never part of the runtime libraries.
//
// Execution model of a launch:
//  * every CUDA thread of a block is a std::thread, so the block's threads really run concurrently
//    (ThreadSanitizer sees their data races); blockIdx / threadIdx / blockDim / gridDim are
//    thread_local;
//  * __syncthreads is a std::barrier over the block's threads; a thread that returns from the
//    kernel drops out of it (as an exited CUDA thread no longer takes part in barriers);
//  * blocks run one after another in a shuffled order (CUDA promises no order between blocks);
//  * shared memory is per block: the static variables (DETLAYERS_SHARED) live in an arena that is
//    refilled with random garbage before every block, and whose unused bytes are poisoned under
//    AddressSanitizer; the dynamic array is a separate, exactly sized, garbage-filled allocation;
//  * launch errors follow CUDA's rules for block size and shared memory (static + dynamic above
//    48 KB needs cudaFuncAttributeMaxDynamicSharedMemorySize) and are reported by cudaGetLastError.
// The driver and device queries answer from cuda_sim::config, which tests change.
#ifndef DETLAYERS_TESTS_CUDA_SIMULATOR_H_
#define DETLAYERS_TESTS_CUDA_SIMULATOR_H_

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define DETLAYERS_SIM_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define DETLAYERS_SIM_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define DETLAYERS_SIM_POISON(p, n) ((void)(p), (void)(n))
#define DETLAYERS_SIM_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define CUDART_VERSION 13000

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline int __ffsll(long long x) { return x == 0 ? 0 : __builtin_ctzll(static_cast<unsigned long long>(x)) + 1; }
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(x)) + 1; }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

using cudaStream_t = struct CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidConfiguration = 9,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 0;
  int maxThreadsPerBlock = 1024;
};

struct cudaDeviceProp {
  int major = 0;
  int minor = 0;
};

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

namespace cuda_sim {

constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptInSharedBytes = 227 * 1024;  // per block, as on sm_90
constexpr size_t kStaticArenaBytes = 48 * 1024;

// What the driver and device queries report; tests change it.
struct Config {
  int driver_version = 13000;  // 0: no driver
  int device_count = 1;
  int major = 9, minor = 0;
  bool kernel_images = true;  // false: every kernel query fails as for a GPU without matching code
};
inline Config config;

struct KernelState {
  size_t static_bytes = 0;        // largest static shared memory a launch of it declared
  size_t max_dynamic_bytes = 0;   // cudaFuncAttributeMaxDynamicSharedMemorySize; 0: never set
};
inline std::mutex kernels_mutex;
inline std::map<const void*, KernelState> kernels;
inline cudaError_t last_error = cudaSuccess;
inline int current_device = 0;

inline KernelState& kernel_state(const void* kernel) {
  std::lock_guard<std::mutex> lock(kernels_mutex);
  return kernels[kernel];
}

// True when a launch of `kernel` with `dynamic_bytes` of dynamic shared memory is accepted: the
// total must fit the default 48 KB unless the kernel opted in to that much dynamic memory.
inline bool launch_fits(const void* kernel, size_t dynamic_bytes) {
  const KernelState& s = kernel_state(kernel);
  if (s.static_bytes + dynamic_bytes > kOptInSharedBytes) return false;
  if (s.static_bytes + dynamic_bytes <= kDefaultSharedBytes) return true;
  return dynamic_bytes <= s.max_dynamic_bytes;
}

inline void fill_garbage(void* data, size_t bytes, uint64_t seed) {
  auto* p = static_cast<unsigned char*>(data);
  std::mt19937_64 rng(seed);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, 8);
  }
  for (; i < bytes; ++i) p[i] = static_cast<unsigned char>(rng());
}

// Per-block state, written by the launching thread before the block's threads start.
struct Block {
  std::unique_ptr<std::barrier<>> sync;
  unsigned char* static_arena = nullptr;
  unsigned char* dynamic_shared = nullptr;
};
inline Block* current_block = nullptr;  // read by the block's threads after the start barrier
inline thread_local size_t static_cursor = 0;
inline thread_local size_t static_high_water = 0;

// The block's instance of the next DETLAYERS_SHARED variable of this thread: every thread of a
// block declares the same variables in the same order, so all get the same addresses.
template <typename T>
T& block_shared() {
  constexpr size_t align = alignof(T) < 16 ? 16 : alignof(T);
  static_cursor = (static_cursor + align - 1) / align * align;
  unsigned char* p = current_block->static_arena + static_cursor;
  DETLAYERS_SIM_UNPOISON(p, sizeof(T));
  static_cursor += sizeof(T) + 16;  // 16 poisoned bytes between variables
  static_high_water = std::max(static_high_water, static_cursor);
  return *reinterpret_cast<T*>(p);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current_block->dynamic_shared);
}

inline void syncthreads() { current_block->sync->arrive_and_wait(); }

inline uint64_t launch_counter = 0;

// Runs `body` (one CUDA thread's work) over `grid` x `block` as described at the top.
template <typename Body>
void run(const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes, const Body& body) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (!launch_fits(kernel, dynamic_bytes)) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  const uint64_t seed = ++launch_counter * 0x9E3779B97F4A7C15ull;
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));

  std::vector<unsigned char> arena(kStaticArenaBytes);
  std::vector<unsigned char> dynamic(dynamic_bytes);
  Block state;
  state.static_arena = arena.data();
  state.dynamic_shared = dynamic_bytes ? dynamic.data() : nullptr;
  std::barrier start(static_cast<std::ptrdiff_t>(threads + 1));
  std::barrier done(static_cast<std::ptrdiff_t>(threads + 1));
  std::vector<size_t> high_water(threads, 0);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (size_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      gridDim = grid;
      blockDim = block;
      threadIdx = dim3(static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                       static_cast<unsigned>(t / (static_cast<size_t>(block.x) * block.y)));
      for (const dim3& b : order) {
        start.arrive_and_wait();
        blockIdx = b;
        static_cursor = 0;
        body();
        current_block->sync->arrive_and_drop();
        done.arrive_and_wait();
      }
      high_water[t] = static_high_water;
    });
  }
  uint64_t block_seed = seed;
  for (size_t b = 0; b < order.size(); ++b) {
    DETLAYERS_SIM_UNPOISON(arena.data(), arena.size());
    fill_garbage(arena.data(), arena.size(), ++block_seed);
    DETLAYERS_SIM_POISON(arena.data(), arena.size());
    fill_garbage(dynamic.data(), dynamic.size(), ~block_seed);
    state.sync = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(threads));
    current_block = &state;
    start.arrive_and_wait();
    done.arrive_and_wait();
  }
  for (auto& w : workers) w.join();
  DETLAYERS_SIM_UNPOISON(arena.data(), arena.size());
  current_block = nullptr;
  KernelState& s = kernel_state(kernel);
  s.static_bytes = std::max(s.static_bytes, *std::max_element(high_water.begin(), high_water.end()));
}

// DETLAYERS_LAUNCH(kernel, grid, block, shared, stream)(args...): the kernel runs to completion
// before the call returns (the simulator has no streams).
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t dynamic_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    auto bound = [kernel = kernel, &args...] { kernel(static_cast<Params>(args)...); };
    run(reinterpret_cast<const void*>(kernel), grid, block, dynamic_bytes, bound);
  }
};

template <typename... Params>
Launcher(void (*)(Params...), dim3, dim3, size_t) -> Launcher<Params...>;

}  // namespace cuda_sim

#define __syncthreads() ::cuda_sim::syncthreads()
#define DETLAYERS_SHARED(name, ...) __VA_ARGS__& name = ::cuda_sim::block_shared<__VA_ARGS__>()
#define DETLAYERS_DYNAMIC_SHARED(name, type) type* name = ::cuda_sim::dynamic_shared<type>()
#define DETLAYERS_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::cuda_sim::Launcher{(kernel), dim3(grid), dim3(block), static_cast<size_t>(shared_bytes)}

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = cuda_sim::last_error;
  cuda_sim::last_error = cudaSuccess;
  return err;
}

template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T* kernel) {
  if (!cuda_sim::config.kernel_images) return cuda_sim::last_error = cudaErrorNoKernelImageForDevice;
  const cuda_sim::KernelState& s = cuda_sim::kernel_state(reinterpret_cast<const void*>(kernel));
  attributes->sharedSizeBytes = s.static_bytes;
  attributes->maxDynamicSharedSizeBytes =
      static_cast<int>(std::max(s.max_dynamic_bytes, cuda_sim::kDefaultSharedBytes - s.static_bytes));
  return cudaSuccess;
}

template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attribute, int value) {
  cuda_sim::KernelState& s = cuda_sim::kernel_state(reinterpret_cast<const void*>(kernel));
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      s.static_bytes + static_cast<size_t>(value) > cuda_sim::kOptInSharedBytes) {
    return cuda_sim::last_error = cudaErrorInvalidValue;
  }
  s.max_dynamic_bytes = static_cast<size_t>(value);
  return cudaSuccess;
}

inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = cuda_sim::config.driver_version;
  return cudaSuccess;
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  if (cuda_sim::config.driver_version < CUDART_VERSION / 1000 * 1000) {
    *count = 0;
    return cuda_sim::last_error = cudaErrorInsufficientDriver;
  }
  *count = cuda_sim::config.device_count;
  return cuda_sim::config.device_count > 0 ? cudaSuccess : (cuda_sim::last_error = cudaErrorNoDevice);
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = cuda_sim::current_device;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= cuda_sim::config.device_count) return cuda_sim::last_error = cudaErrorInvalidValue;
  cuda_sim::current_device = device;
  return cudaSuccess;
}

inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= cuda_sim::config.device_count) return cuda_sim::last_error = cudaErrorInvalidValue;
  prop->major = cuda_sim::config.major;
  prop->minor = cuda_sim::config.minor;
  return cudaSuccess;
}

#endif  // DETLAYERS_TESTS_CUDA_SIMULATOR_H_
