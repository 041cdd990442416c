// Host emulation of the CUDA bitmask NMS (nms_cuda.cu), exported with a plain C ABI for the tests
// (tests/test_nms.py calls it through ctypes). It runs the same per-thread functions from
// nms_bitmask.h in a sequential order that respects the kernels' barriers, so the GPU algorithm's
// logic is checked against torchvision/detectron2 fixtures even where no GPU exists. Not used by
// the XLA custom calls.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "nms_bitmask.h"

#if __has_include("rotated_iou.h")
#include "rotated_iou.h"
#define DETLAYERS_HAVE_ROTATED_IOU 1
#endif

namespace detlayers {
namespace {

using bitmask::kTile;
using bitmask::Word;

#ifdef DETLAYERS_HAVE_ROTATED_IOU
struct RotatedIoU {
  static float iou(const float* a, const float* b) {  // as nms_cuda.cu's BoxIoU<5>
    return bitmask::rotated_discs_apart(a, b) ? 0.0f : rotated_box_iou<float>(a, b);
  }
};
#endif

template <int kBoxDim, bool kClasses, typename IoU>
int64_t emulate(const float* boxes, const int32_t* classes, int64_t n, float threshold, int64_t k,
                int32_t* keep) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<Word> mask(static_cast<size_t>(n * tiles), 0);
  // nms_mask_kernel: block (col_tile, row_tile), thread t = row within the tile
  for (int64_t row_tile = 0; row_tile < tiles; ++row_tile) {
    for (int64_t col_tile = row_tile; col_tile < tiles; ++col_tile) {
      const int64_t row_start = row_tile * kTile, col_start = col_tile * kTile;
      const int row_size = static_cast<int>(std::min<int64_t>(n - row_start, kTile));
      const int col_size = static_cast<int>(std::min<int64_t>(n - col_start, kTile));
      for (int t = 0; t < row_size; ++t) {
        const int64_t i = row_start + t;
        const int first = (row_tile == col_tile) ? t + 1 : 0;
        mask[i * tiles + col_tile] = bitmask::mask_word<kBoxDim, kClasses, IoU>(
            boxes + i * kBoxDim, kClasses ? classes[i] : 0, boxes + col_start * kBoxDim,
            kClasses ? classes + col_start : nullptr, first, col_size, threshold);
      }
    }
  }
  // nms_reduce_kernel: one block; phases separated by __syncthreads run one after the other
  std::vector<Word> removed(static_cast<size_t>(tiles), 0);
  Word diagonal[kTile];
  int64_t num_kept = 0;
  for (int64_t tile = 0; tile < tiles && k > 0; ++tile) {
    const int64_t base = tile * kTile;
    const int size = static_cast<int>(std::min<int64_t>(n - base, kTile));
    for (int t = 0; t < size; ++t) diagonal[t] = mask[(base + t) * tiles + tile];
    const Word kept = bitmask::scan_tile(removed[tile], diagonal, size, base, k, &num_kept, keep);
    if (num_kept >= k) break;
    if (kept != 0) {
      for (int64_t c = tile + 1; c < tiles; ++c) {
        removed[c] = bitmask::merge_kept_rows(removed[c], kept, mask.data(), base, tiles, c);
      }
    }
  }
  for (int64_t s = num_kept; s < k; ++s) keep[s] = -1;
  return num_kept;
}

}  // namespace
}  // namespace detlayers

// boxes [n, box_dim] sorted by decreasing score; classes [n] or null; keep [k]. Returns the count,
// or -1 for an unsupported box_dim.
extern "C" int64_t DetlayersBitmaskNmsEmulation(const float* boxes, const int32_t* classes, int64_t n,
                                                 int32_t box_dim, float threshold, int64_t k, int32_t* keep) {
  using namespace detlayers;
  if (box_dim == 4) {
    return classes ? emulate<4, true, bitmask::PairIoU<4>>(boxes, classes, n, threshold, k, keep)
                   : emulate<4, false, bitmask::PairIoU<4>>(boxes, classes, n, threshold, k, keep);
  }
#ifdef DETLAYERS_HAVE_ROTATED_IOU
  if (box_dim == 5) {
    return classes ? emulate<5, true, RotatedIoU>(boxes, classes, n, threshold, k, keep)
                   : emulate<5, false, RotatedIoU>(boxes, classes, n, threshold, k, keep);
  }
#endif
  return -1;
}
