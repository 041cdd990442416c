// CUDA XLA custom calls (typed FFI) for greedy non-maximum suppression, fully on the device.
//
// Same contract as nms_cpu.cc (boxes already sorted by decreasing score, leading dimensions are a
// batch of independent problems), plus one extra result used as device workspace:
//   mask u32[..., N, ceil(N/64), 2]   bit j of the 64-bit word (i, c) says box i suppresses box
//                                     64*c + j (both in score order)
//
// Two launches per call, whatever the batch size:
//  1. nms_mask_kernel: one thread per (box i, 64-box column tile), grid (tiles, tiles, batch).
//     Only tiles at or right of the diagonal are computed; the reduction never reads the others.
//  2. nms_reduce_kernel: one block per problem walks the mask in score order, 64 boxes at a time,
//     keeping the "removed" bitset in shared memory. This is torchvision's host loop moved onto
//     the GPU, so there is no device-to-host copy and no stream synchronization anywhere: the
//     handler only enqueues work on XLA's stream.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "nms_bitmask.h"
#include "nms_box_iou.h"
#include "nms_ffi_shapes.h"
#include "xla/ffi/api/ffi.h"

#if __has_include("rotated_iou.h")
#include "rotated_iou.h"
#define DETLAYERS_HAVE_ROTATED_IOU 1
#endif

namespace ffi = xla::ffi;

namespace detlayers {
namespace {

using bitmask::kTile;
using bitmask::Word;
constexpr int kReduceThreads = 256;   // threads of the per-problem reduction block
constexpr int64_t kMaxGridY = 65535;  // CUDA limit on gridDim.y and gridDim.z

template <int kBoxDim>
struct BoxIoU : bitmask::PairIoU<kBoxDim> {};

#ifdef DETLAYERS_HAVE_ROTATED_IOU
template <>
struct BoxIoU<5> {
  __device__ static float iou(const float* a, const float* b) {
    return bitmask::rotated_discs_apart(a, b) ? 0.0f : rotated_box_iou<float>(a, b);
  }
};
#endif

template <int kBoxDim, bool kClasses>
__global__ void __launch_bounds__(kTile) nms_mask_kernel(const float* __restrict__ boxes,
                                                         const int32_t* __restrict__ classes,
                                                         const float* __restrict__ thresholds, int64_t n,
                                                         int64_t tiles, Word* __restrict__ mask) {
  const int64_t problem = blockIdx.z;
  const int64_t row_tile = blockIdx.y;
  const int64_t col_tile = blockIdx.x;
  if (col_tile < row_tile) return;  // below the diagonal: never read
  const int64_t row_start = row_tile * kTile;
  const int64_t col_start = col_tile * kTile;
  const int row_size = static_cast<int>(min(n - row_start, static_cast<int64_t>(kTile)));
  const int col_size = static_cast<int>(min(n - col_start, static_cast<int64_t>(kTile)));
  boxes += problem * n * kBoxDim;
  mask += problem * n * tiles;

  __shared__ float col_boxes[kTile * kBoxDim];
  __shared__ int32_t col_classes[kTile];
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
  mask[i * tiles + col_tile] = bits;
}

// One block per problem. Shared memory: `tiles` words of "removed" bits.
__global__ void __launch_bounds__(kReduceThreads) nms_reduce_kernel(const Word* __restrict__ mask, int64_t n,
                                                                    int64_t tiles, int64_t k,
                                                                    int32_t* __restrict__ keep,
                                                                    int32_t* __restrict__ count) {
  extern __shared__ Word removed[];
  __shared__ Word diagonal[kTile];
  __shared__ Word kept_bits;
  __shared__ int64_t num_kept;
  const int64_t problem = blockIdx.x;
  mask += problem * n * tiles;
  keep += problem * k;
  const int t = threadIdx.x;

  for (int64_t c = t; c < tiles; c += blockDim.x) removed[c] = 0;
  if (t == 0) num_kept = 0;
  __syncthreads();

  for (int64_t tile = 0; tile < tiles && k > 0; ++tile) {
    const int64_t base = tile * kTile;
    const int size = static_cast<int>(min(n - base, static_cast<int64_t>(kTile)));
    // Each box's word for its own tile, fetched in parallel before the sequential scan.
    if (t < size) diagonal[t] = mask[(base + t) * tiles + tile];
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
        removed[c] = bitmask::merge_kept_rows(removed[c], kept, mask, base, tiles, c);
      }
    }
    __syncthreads();
  }
  __syncthreads();
  const int64_t nk = num_kept;
  for (int64_t s = nk + t; s < k; s += blockDim.x) keep[s] = -1;
  if (t == 0) count[problem] = static_cast<int32_t>(nk);
}

template <int kBoxDim, bool kClasses>
ffi::Error nms_cuda_impl(cudaStream_t stream, ffi::Buffer<ffi::F32> boxes, const int32_t* classes,
                         int64_t classes_count, ffi::Buffer<ffi::F32> threshold,
                         ffi::ResultBuffer<ffi::S32> keep, ffi::ResultBuffer<ffi::S32> count,
                         ffi::ResultBuffer<ffi::U32> mask) {
  ProblemShape shape;
  if (ffi::Error err = check_shapes(boxes.dimensions(), kBoxDim, kClasses ? &classes_count : nullptr,
                                    threshold.element_count(), keep->dimensions(), count->element_count(), &shape);
      err.failure()) {
    return err;
  }
  const int64_t batch = shape.batch;
  const int64_t n = shape.n;
  const int64_t k = shape.k;
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (static_cast<int64_t>(mask->element_count()) != batch * n * tiles * 2) {
    return ffi::Error::InvalidArgument("detlayers nms: mask workspace must be [..., N, ceil(N/64), 2]");
  }
  if (batch == 0) return ffi::Error::Success();
  if (tiles > kMaxGridY || batch > kMaxGridY) {
    return ffi::Error::InvalidArgument("detlayers nms: too many boxes or problems for the CUDA kernel");
  }
  const size_t shared_bytes = static_cast<size_t>(tiles) * sizeof(Word);
  if (shared_bytes > 48 * 1024) {
    // More than the default dynamic shared memory (N > 393216): opt in to the larger carve-out.
    if (cudaFuncSetAttribute(nms_reduce_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(shared_bytes)) != cudaSuccess) {
      cudaGetLastError();
      return ffi::Error::InvalidArgument("detlayers nms: N too large for the on-device reduction");
    }
  }
  Word* words = reinterpret_cast<Word*>(mask->typed_data());
  if (n > 0) {
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles), static_cast<unsigned>(batch));
    nms_mask_kernel<kBoxDim, kClasses>
        <<<grid, kTile, 0, stream>>>(boxes.typed_data(), classes, threshold.typed_data(), n, tiles, words);
  }
  nms_reduce_kernel<<<static_cast<unsigned>(batch), kReduceThreads, shared_bytes, stream>>>(
      words, n, tiles, k, keep->typed_data(), count->typed_data());
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    return ffi::Error::Internal(std::string("detlayers nms: CUDA launch failed: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// The XLA handlers differ only in D (4 or 5) and in whether classes are passed.
template <int kBoxDim>
ffi::Error nms_plain(cudaStream_t stream, ffi::Buffer<ffi::F32> boxes, ffi::Buffer<ffi::F32> threshold,
                     ffi::ResultBuffer<ffi::S32> keep, ffi::ResultBuffer<ffi::S32> count,
                     ffi::ResultBuffer<ffi::U32> mask) {
  return nms_cuda_impl<kBoxDim, false>(stream, boxes, nullptr, 0, threshold, keep, count, mask);
}

template <int kBoxDim>
ffi::Error nms_with_classes(cudaStream_t stream, ffi::Buffer<ffi::F32> boxes, ffi::Buffer<ffi::S32> classes,
                            ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> keep,
                            ffi::ResultBuffer<ffi::S32> count, ffi::ResultBuffer<ffi::U32> mask) {
  return nms_cuda_impl<kBoxDim, true>(stream, boxes, classes.typed_data(),
                                      static_cast<int64_t>(classes.element_count()), threshold, keep, count,
                                      mask);
}

}  // namespace
}  // namespace detlayers

#define DETLAYERS_NMS_CUDA_BINDING(...)                        \
  ffi::Ffi::Bind()                                             \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                \
      .Arg<ffi::Buffer<ffi::F32>>() __VA_ARGS__                \
      .Arg<ffi::Buffer<ffi::F32>>()                            \
      .Ret<ffi::Buffer<ffi::S32>>()                            \
      .Ret<ffi::Buffer<ffi::S32>>()                            \
      .Ret<ffi::Buffer<ffi::U32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersNmsCuda, detlayers::nms_plain<4>, DETLAYERS_NMS_CUDA_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersBatchedNmsCuda, detlayers::nms_with_classes<4>,
                              DETLAYERS_NMS_CUDA_BINDING(.Arg<ffi::Buffer<ffi::S32>>()));
#ifdef DETLAYERS_HAVE_ROTATED_IOU
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersNmsRotatedCuda, detlayers::nms_plain<5>, DETLAYERS_NMS_CUDA_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersBatchedNmsRotatedCuda, detlayers::nms_with_classes<5>,
                              DETLAYERS_NMS_CUDA_BINDING(.Arg<ffi::Buffer<ffi::S32>>()));
#endif
