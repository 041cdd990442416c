// CUDA XLA custom calls (typed FFI) for greedy non-maximum suppression, fully on the device.
//
// Same contract as nms_cpu.cc (boxes already sorted by decreasing score, leading dimensions are a
// batch of independent problems), plus one extra result used as device workspace:
//   mask u32[..., W, 2]   W = bitmask::mask_words(ceil(N/64)) 64-bit words per image, the packed
//                         upper triangle of the N x ceil(N/64) suppression bitmask (nms_bitmask.h):
//                         bit j of word (i, c) says box i suppresses box 64*c + j (score order)
//
// Two launches per call, whatever the batch size:
//  1. nms_mask_kernel: one thread per (box i, 64-box column tile), grid (tiles, tiles, batch).
//     Only tiles at or right of the diagonal are computed (and stored); the reduction never reads
//     the others.
//  2. nms_reduce_kernel: one block per problem walks the mask in score order, 64 boxes at a time,
//     keeping the "removed" bitset in shared memory. This is torchvision's host loop moved onto
//     the GPU, so there is no device-to-host copy and no stream synchronization anywhere: the
//     handler only enqueues work on XLA's stream (which is why it is declared compatible with
//     command buffers / CUDA graphs).
//
// The kernels and the launch code are also compiled for the host by the CUDA simulator test
// (tests/cpp/nms_cuda_simulator.cc, run by tests/test_cuda_simulation.py): with
// DETLAYERS_CUDA_SIMULATOR defined, tests/cpp/cuda_simulator.h replaces the CUDA runtime (one
// std::thread per CUDA thread, std::barrier for __syncthreads, garbage-filled shared memory) and
// the XLA handlers at the end of this file are left out.
//
// Rotated boxes: detectron2's IoU recomputes the corners of both boxes relative to the midpoint of
// their centres (rotated_iou.h, step 1) so that its float32 rounding is reproduced bit for bit;
// corners precomputed once per box would round differently, so they are not cached.
#ifdef DETLAYERS_CUDA_SIMULATOR
#include "cuda_simulator.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstdio>
#include <string>

#include "nms_bitmask.h"
#include "nms_box_iou.h"
#include "rotated_iou.h"

#ifndef DETLAYERS_CUDA_SIMULATOR
// Shared memory and launches, spelled so that the simulator can substitute its own.
#define DETLAYERS_SHARED(name, ...) __shared__ __VA_ARGS__ name
#define DETLAYERS_DYNAMIC_SHARED(name, type) extern __shared__ type name[]
#define DETLAYERS_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>
#endif

namespace detlayers {
namespace cuda_nms {

using bitmask::kTile;
using bitmask::Word;
constexpr int kReduceThreads = 256;            // threads of the per-problem reduction block
constexpr int64_t kMaxGridY = 65535;           // CUDA limit on gridDim.y and gridDim.z
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // per block, without the opt-in attribute

template <typename T, int kSize>
using SharedArray = T[kSize];

template <int kBoxDim>
struct BoxIoU : bitmask::PairIoU<kBoxDim> {};

template <>
struct BoxIoU<5> {
  DETLAYERS_HOST_DEVICE static float iou(const float* a, const float* b) {
    return bitmask::rotated_discs_apart(a, b) ? 0.0f : rotated_box_iou<float>(a, b);
  }
};

template <int kBoxDim, bool kClasses>
__global__ void __launch_bounds__(kTile) nms_mask_kernel(const float* __restrict__ boxes,
                                                         const int32_t* __restrict__ classes,
                                                         const float* __restrict__ thresholds, int64_t n,
                                                         int64_t tiles, Word* __restrict__ mask) {
  const int64_t problem = blockIdx.z;
  const int64_t row_tile = blockIdx.y;
  const int64_t col_tile = blockIdx.x;
  if (col_tile < row_tile) return;  // below the diagonal: never read, not stored
  const int64_t row_start = row_tile * kTile;
  const int64_t col_start = col_tile * kTile;
  const int row_size = static_cast<int>(min(n - row_start, static_cast<int64_t>(kTile)));
  const int col_size = static_cast<int>(min(n - col_start, static_cast<int64_t>(kTile)));
  boxes += problem * n * kBoxDim;
  mask += problem * bitmask::mask_words(tiles);

  DETLAYERS_SHARED(col_boxes, SharedArray<float, kTile * kBoxDim>);
  DETLAYERS_SHARED(col_classes, SharedArray<int32_t, kTile>);
  const int t = threadIdx.x;
  if (t < col_size) {
#pragma unroll
    for (int d = 0; d < kBoxDim; ++d) col_boxes[t * kBoxDim + d] = boxes[(col_start + t) * kBoxDim + d];
    if (kClasses) col_classes[t] = classes[problem * n + col_start + t];
  }
  __syncthreads();
  if (t >= row_size) return;

  const int64_t i = row_start + t;
  float box[kBoxDim];
#pragma unroll
  for (int d = 0; d < kBoxDim; ++d) box[d] = boxes[i * kBoxDim + d];
  const int32_t cls = kClasses ? classes[problem * n + i] : 0;
  const int first = (row_tile == col_tile) ? t + 1 : 0;
  const Word bits = bitmask::mask_word<kBoxDim, kClasses, BoxIoU<kBoxDim>>(box, cls, col_boxes, col_classes, first,
                                                                          col_size, thresholds[problem]);
  const int64_t stride = tiles - row_tile;
  mask[bitmask::row_tile_offset(row_tile, tiles) + t * stride + (col_tile - row_tile)] = bits;
}

// One block per problem. Dynamic shared memory: `tiles` words of "removed" bits.
__global__ void __launch_bounds__(kReduceThreads) nms_reduce_kernel(const Word* __restrict__ mask, int64_t n,
                                                                    int64_t tiles, int64_t k,
                                                                    int32_t* __restrict__ keep,
                                                                    int32_t* __restrict__ count) {
  DETLAYERS_DYNAMIC_SHARED(removed, Word);
  DETLAYERS_SHARED(diagonal, SharedArray<Word, kTile>);
  DETLAYERS_SHARED(kept_bits, Word);
  DETLAYERS_SHARED(num_kept, int64_t);
  const int64_t problem = blockIdx.x;
  mask += problem * bitmask::mask_words(tiles);
  keep += problem * k;
  const int t = threadIdx.x;

  for (int64_t c = t; c < tiles; c += blockDim.x) removed[c] = 0;
  if (t == 0) num_kept = 0;
  __syncthreads();

  for (int64_t tile = 0; tile < tiles && k > 0; ++tile) {
    const int64_t base = tile * kTile;
    const int size = static_cast<int>(min(n - base, static_cast<int64_t>(kTile)));
    const Word* rows = mask + bitmask::row_tile_offset(tile, tiles);  // this row tile, packed
    const int64_t stride = tiles - tile;
    // Each box's word for its own tile, fetched in parallel before the sequential scan (strided:
    // correct for any block size, also one smaller than a tile).
    for (int j = t; j < size; j += blockDim.x) diagonal[j] = rows[j * stride];
    __syncthreads();
    if (t == 0) {
      int64_t nk = num_kept;
      kept_bits = bitmask::scan_tile(removed[tile], diagonal, size, base, k, &nk, keep);
      num_kept = nk;
    }
    __syncthreads();
    if (num_kept >= k) break;  // every thread reads the same shared value: uniform exit
    // Boxes kept in this tile remove their overlaps from all later tiles.
    const Word kept = kept_bits;
    if (kept != 0) {
      for (int64_t c = tile + 1 + t; c < tiles; c += blockDim.x) {
        removed[c] = bitmask::merge_kept_rows(removed[c], kept, rows, stride, c - tile);
      }
    }
    __syncthreads();
  }
  __syncthreads();
  const int64_t nk = num_kept;
  for (int64_t s = nk + t; s < k; s += blockDim.x) keep[s] = -1;
  if (t == 0) count[problem] = static_cast<int32_t>(nk);
}

// The reduction needs `dynamic_bytes` of dynamic shared memory on top of its static shared memory.
// A launch whose static + dynamic total exceeds the default 48 KB fails unless the kernel has opted
// in to a larger dynamic size, so the test uses the total (static size from the compiled kernel).
inline cudaError_t prepare_reduce_shared_memory(size_t dynamic_bytes) {
  cudaFuncAttributes attributes;
  if (cudaError_t err = cudaFuncGetAttributes(&attributes, nms_reduce_kernel); err != cudaSuccess) return err;
  if (attributes.sharedSizeBytes + dynamic_bytes <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(nms_reduce_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(dynamic_bytes));
}

// Everything the two launches need; pointers are device pointers.
struct NmsProblem {
  const float* boxes;       // [batch, n, kBoxDim]
  const int32_t* classes;   // [batch, n] or null
  const float* thresholds;  // [batch]
  int64_t batch, n, k;
  int32_t* keep;            // [batch, k]
  int32_t* count;           // [batch]
  Word* mask;               // [batch, mask_words(tiles)]
  int64_t mask_capacity;    // words available at `mask`
};

// Enqueues both kernels on `stream`. Returns an empty string or the reason nothing was launched.
// `reduce_threads` is the reduction's block size (kReduceThreads; the simulator uses fewer so that
// small problems have more tiles than threads).
template <int kBoxDim, bool kClasses>
std::string launch_nms(cudaStream_t stream, const NmsProblem& p, int reduce_threads = kReduceThreads) {
  const int64_t tiles = (p.n + kTile - 1) / kTile;
  const int64_t words = p.batch * bitmask::mask_words(tiles);
  if (p.mask_capacity != words) {
    return "mask workspace must hold " + std::to_string(words) + " 64-bit words, got " +
           std::to_string(p.mask_capacity);
  }
  if (bitmask::mask_words(tiles) > bitmask::kMaxMaskBytes / static_cast<int64_t>(sizeof(Word))) {
    return "the bitmask of " + std::to_string(p.n) +
           " boxes per image exceeds the CUDA kernel's scratch bound; detlayers.nms uses the pure-XLA path there";
  }
  if (p.batch == 0) return "";
  if (tiles > kMaxGridY || p.batch > kMaxGridY) return "too many boxes or problems for the CUDA kernel";
  const size_t shared_bytes = static_cast<size_t>(tiles) * sizeof(Word);
  if (cudaError_t err = prepare_reduce_shared_memory(shared_bytes); err != cudaSuccess) {
    cudaGetLastError();
    return std::string("N too large for the on-device reduction: ") + cudaGetErrorString(err);
  }
  if (p.n > 0) {
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles), static_cast<unsigned>(p.batch));
    auto* mask_kernel = nms_mask_kernel<kBoxDim, kClasses>;
    DETLAYERS_LAUNCH(mask_kernel, grid, kTile, 0, stream)(p.boxes, p.classes, p.thresholds, p.n, tiles, p.mask);
  }
  DETLAYERS_LAUNCH(nms_reduce_kernel, static_cast<unsigned>(p.batch), reduce_threads, shared_bytes, stream)(
      p.mask, p.n, tiles, p.k, p.keep, p.count);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    return std::string("CUDA launch failed: ") + cudaGetErrorString(err);
  }
  return "";
}

// Loader check (see DetlayersNmsCudaCheckRuntime): "" when every visible device can run the kernels.
inline std::string check_runtime() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
    cudaGetLastError();
    return "no CUDA driver found";
  }
  auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  // Within one major version the driver runs newer runtimes (minor version compatibility) as long
  // as no PTX must be JIT-compiled; that case is caught by the kernel-image test below.
  if (driver / 1000 < CUDART_VERSION / 1000) {
    return "built with CUDA " + version(CUDART_VERSION) + " but the driver supports CUDA " + version(driver) +
           " only (update the driver or rebuild with an older CUDA toolkit)";
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    cudaGetLastError();
    return "cannot enumerate CUDA devices";
  }
  int current = 0;
  if (devices > 0 && cudaGetDevice(&current) != cudaSuccess) {
    cudaGetLastError();
    return "cannot query the current CUDA device";
  }
  std::string problem;
  const void* kernels[] = {
      reinterpret_cast<const void*>(nms_mask_kernel<4, false>), reinterpret_cast<const void*>(nms_mask_kernel<4, true>),
      reinterpret_cast<const void*>(nms_mask_kernel<5, false>), reinterpret_cast<const void*>(nms_mask_kernel<5, true>),
      reinterpret_cast<const void*>(nms_reduce_kernel)};
  for (int d = 0; d < devices && problem.empty(); ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess || cudaSetDevice(d) != cudaSuccess) {
      cudaGetLastError();
      problem = "cannot query CUDA device " + std::to_string(d);
      break;
    }
    for (const void* kernel : kernels) {
      cudaFuncAttributes attributes;
      if (cudaError_t err = cudaFuncGetAttributes(&attributes, kernel); err != cudaSuccess) {
        cudaGetLastError();
        problem = "no usable kernel image for CUDA device " + std::to_string(d) + " (compute capability " +
                  std::to_string(prop.major) + "." + std::to_string(prop.minor) + "): " + cudaGetErrorString(err) +
                  "; rebuild with -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=" + std::to_string(prop.major) +
                  std::to_string(prop.minor);
        break;
      }
    }
  }
  if (devices > 0) cudaSetDevice(current);
  return problem;
}

}  // namespace cuda_nms
}  // namespace detlayers

// Called by detlayers/_nms_library.py (ctypes) before it registers the CUDA handlers: returns 0 when the
// installed driver and every visible device can run this library's kernels, else 1 with the reason
// in `message` (NUL-terminated, truncated to `size` bytes). A library built with a newer CUDA than
// the driver, or without code for the device, is then not registered and NMS uses its pure-XLA
// path instead of failing at the first launch.
extern "C" int DetlayersNmsCudaCheckRuntime(char* message, int size) {
  const std::string problem = detlayers::cuda_nms::check_runtime();
  if (message != nullptr && size > 0) std::snprintf(message, static_cast<size_t>(size), "%s", problem.c_str());
  return problem.empty() ? 0 : 1;
}

#ifndef DETLAYERS_CUDA_SIMULATOR
#include "nms_ffi_shapes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace detlayers {
namespace {

template <int kBoxDim, bool kClasses>
ffi::Error nms_cuda_impl(cudaStream_t stream, ffi::Buffer<ffi::F32> boxes, const int32_t* classes,
                         ffi::AnyBuffer::Dimensions* classes_dims, ffi::Buffer<ffi::F32> threshold,
                         ffi::ResultBuffer<ffi::S32> keep, ffi::ResultBuffer<ffi::S32> count,
                         ffi::ResultBuffer<ffi::U32> mask) {
  ProblemShape shape;
  if (ffi::Error err = check_shapes(boxes.dimensions(), kBoxDim, classes_dims, threshold.dimensions(),
                                    keep->dimensions(), count->dimensions(), &shape);
      err.failure()) {
    return err;
  }
  const int64_t tiles = (shape.n + cuda_nms::kTile - 1) / cuda_nms::kTile;
  if (ffi::Error err = check_workspace(mask->dimensions(), boxes.dimensions(), bitmask::mask_words(tiles));
      err.failure()) {
    return err;
  }
  const cuda_nms::NmsProblem problem{boxes.typed_data(),
                                     classes,
                                     threshold.typed_data(),
                                     shape.batch,
                                     shape.n,
                                     shape.k,
                                     keep->typed_data(),
                                     count->typed_data(),
                                     reinterpret_cast<cuda_nms::Word*>(mask->typed_data()),
                                     static_cast<int64_t>(mask->element_count() / 2)};
  const std::string error = cuda_nms::launch_nms<kBoxDim, kClasses>(stream, problem);
  if (!error.empty()) return ffi::Error::InvalidArgument("detlayers nms: " + error);
  return ffi::Error::Success();
}

// The XLA handlers differ only in D (4 or 5) and in whether classes are passed.
template <int kBoxDim>
ffi::Error nms_plain(cudaStream_t stream, ffi::Buffer<ffi::F32> boxes, ffi::Buffer<ffi::F32> threshold,
                     ffi::ResultBuffer<ffi::S32> keep, ffi::ResultBuffer<ffi::S32> count,
                     ffi::ResultBuffer<ffi::U32> mask) {
  return nms_cuda_impl<kBoxDim, false>(stream, boxes, nullptr, nullptr, threshold, keep, count, mask);
}

template <int kBoxDim>
ffi::Error nms_with_classes(cudaStream_t stream, ffi::Buffer<ffi::F32> boxes, ffi::Buffer<ffi::S32> classes,
                            ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> keep,
                            ffi::ResultBuffer<ffi::S32> count, ffi::ResultBuffer<ffi::U32> mask) {
  ffi::AnyBuffer::Dimensions classes_dims = classes.dimensions();
  return nms_cuda_impl<kBoxDim, true>(stream, boxes, classes.typed_data(), &classes_dims, threshold, keep, count,
                                      mask);
}

}  // namespace
}  // namespace detlayers

// Command-buffer compatible: the handler only enqueues kernels on XLA's stream (no host
// synchronization, no allocation, no host-visible result), so XLA may record it into a CUDA graph.
// Its host-side attribute calls are not stream work, and the kernels' modules are already loaded by
// the loader's DetlayersNmsCudaCheckRuntime (which queries every kernel on every device), so no
// lazy module loading happens inside a capture.
#define DETLAYERS_NMS_CUDA_BINDING(...)                        \
  ffi::Ffi::Bind()                                             \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                \
      .Arg<ffi::Buffer<ffi::F32>>() __VA_ARGS__                \
      .Arg<ffi::Buffer<ffi::F32>>()                            \
      .Ret<ffi::Buffer<ffi::S32>>()                            \
      .Ret<ffi::Buffer<ffi::S32>>()                            \
      .Ret<ffi::Buffer<ffi::U32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersNmsCuda, detlayers::nms_plain<4>, DETLAYERS_NMS_CUDA_BINDING(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersBatchedNmsCuda, detlayers::nms_with_classes<4>,
                              DETLAYERS_NMS_CUDA_BINDING(.Arg<ffi::Buffer<ffi::S32>>()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersNmsRotatedCuda, detlayers::nms_plain<5>, DETLAYERS_NMS_CUDA_BINDING(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersBatchedNmsRotatedCuda, detlayers::nms_with_classes<5>,
                              DETLAYERS_NMS_CUDA_BINDING(.Arg<ffi::Buffer<ffi::S32>>()),
                              {ffi::Traits::kCmdBufferCompatible});
#endif  // DETLAYERS_CUDA_SIMULATOR
