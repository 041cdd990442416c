// The per-thread steps of bitmask NMS used by the CUDA kernels (nms_cuda.cu). The kernels are also
// compiled for the host by the CUDA simulator test (tests/cpp/nms_cuda_simulator.cc), which defines
// DETLAYERS_CUDA_SIMULATOR and supplies the device intrinsics used under DETLAYERS_DEVICE_CODE.
//
// Boxes are sorted by decreasing score. Word (i, c) of the mask has bit j set when box i suppresses
// box 64*c + j (IoU(i, that box) > threshold, same class, and 64*c + j > i). Only words with
// c >= i / 64 exist: the mask is stored packed by row tile (see row_tile_offset), so an image needs
// 64 * tiles * (tiles + 1) / 2 words instead of N * tiles.
#ifndef DETLAYERS_NMS_BITMASK_H_
#define DETLAYERS_NMS_BITMASK_H_

// Device code: real CUDA device compilation, or the host simulator, which supplies the intrinsics.
#if defined(__CUDA_ARCH__) || defined(DETLAYERS_CUDA_SIMULATOR)
#define DETLAYERS_DEVICE_CODE 1
#endif

#include <math.h>
#include <stdint.h>

#include "nms_box_iou.h"
#include "rotated_iou.h"

namespace detlayers {
namespace bitmask {

constexpr int kTile = 64;  // boxes per mask word (Python: detlayers.nms.CUDA_TILE)
using Word = unsigned long long;
// Largest scratch mask of one image: 1 GiB, N <= 131008 boxes (Python: detlayers.nms.CUDA_MAX_MASK_BYTES,
// where larger images take the pure-XLA path and vmapped batches are split into calls within it).
constexpr int64_t kMaxMaskBytes = int64_t{1} << 30;

template <int kBoxDim>
struct PairIoU;

template <>
struct PairIoU<4> {
  DETLAYERS_HOST_DEVICE static float iou(const float* a, const float* b) {
    return box_iou(a, box_area(a), b, box_area(b));
  }
};

// Disc test for rotated boxes (rotated_iou.h's rotated_reach, the one definition): true when
// the boxes cannot overlap, so their IoU is 0 and the polygon intersection can be skipped.
DETLAYERS_HOST_DEVICE inline bool rotated_discs_apart(const float* a, const float* b) {
  return ::detlayers::rotated_discs_apart(a, rotated_reach(a), b, rotated_reach(b));
}

// Packed mask layout. Row tile r (rows 64r .. 64r+63) stores, row after row, only its words for the
// column tiles c = r .. tiles-1, so row i of tile r starts at row_tile_offset(r) + (i - 64r) *
// (tiles - r). Within a row, consecutive column tiles are adjacent: the reduction's threads, which
// each own one column tile, read one kept row's words with coalesced loads.
DETLAYERS_HOST_DEVICE inline int64_t row_tile_offset(int64_t row_tile, int64_t tiles) {
  return kTile * (row_tile * tiles - row_tile * (row_tile - 1) / 2);
}

// Words of one image's mask: kTile rows for each of the tiles * (tiles + 1) / 2 (row, column) tile
// pairs on or right of the diagonal.
DETLAYERS_HOST_DEVICE inline int64_t mask_words(int64_t tiles) { return kTile * (tiles * (tiles + 1) / 2); }

// Mask word of box `i` (coordinates `box`, class `cls`) against the column tile whose boxes are
// `col_boxes[0..col_size)` (classes `col_classes`, ignored without classes); `first` is the first
// column worth testing (i + 1 - col_start on the diagonal tile, else 0). The higher-scoring box
// (the row) is the IoU's first argument, as in torchvision and detectron2.
template <int kBoxDim, bool kClasses, typename IoU>
DETLAYERS_HOST_DEVICE inline Word mask_word(const float* box, int32_t cls, const float* col_boxes,
                                            const int32_t* col_classes, int first, int col_size,
                                            float threshold) {
  Word bits = 0;
  for (int j = first; j < col_size; ++j) {
    if (kClasses && col_classes[j] != cls) continue;
    if (IoU::iou(box, col_boxes + j * kBoxDim) > threshold) bits |= Word{1} << j;
  }
  return bits;
}

// The sequential part of the reduction for one tile: walks its `size` boxes in score order,
// starting from the tile's `removed` word; each box not yet removed is kept (written to
// keep[num_kept++], while num_kept < k) and removes what its diagonal word says. Returns the bits
// of the boxes kept in this tile; `num_kept` is updated.
DETLAYERS_HOST_DEVICE inline Word scan_tile(Word removed, const Word* diagonal, int size, int64_t base,
                                            int64_t k, int64_t* num_kept, int32_t* keep) {
  Word kept = 0;
  int64_t nk = *num_kept;
  for (int j = 0; j < size && nk < k; ++j) {
    if (removed & (Word{1} << j)) continue;
    kept |= Word{1} << j;
    keep[nk++] = static_cast<int32_t>(base + j);
    removed |= diagonal[j];
  }
  *num_kept = nk;
  return kept;
}

DETLAYERS_HOST_DEVICE inline int lowest_set_bit(Word bits) {
#if defined(DETLAYERS_DEVICE_CODE)
  return __ffsll(static_cast<long long>(bits)) - 1;
#else
  return __builtin_ctzll(bits);
#endif
}

// Word `col` (column tile tile + col) of the "removed" set after the boxes `kept` (bits of one row
// tile, whose packed rows start at `rows` with `stride` words each) are applied: what each
// reduction thread does for its later column tiles. The loop is latency bound (each kept row costs
// one global load that is almost never cached), so the loads are issued four at a time, all in
// flight before the first is used, instead of one dependent load per iteration.
DETLAYERS_HOST_DEVICE inline Word merge_kept_rows(Word removed, Word kept, const Word* rows, int64_t stride,
                                                  int64_t col) {
  Word bits = kept;
  while (bits != 0) {
    int j[4];
    int loads = 0;
    for (; loads < 4 && bits != 0; ++loads) {
      j[loads] = lowest_set_bit(bits);
      bits &= bits - 1;
    }
    Word w[4] = {0, 0, 0, 0};
    for (int l = 0; l < loads; ++l) w[l] = rows[j[l] * stride + col];
    removed |= (w[0] | w[1]) | (w[2] | w[3]);
  }
  return removed;
}

}  // namespace bitmask
}  // namespace detlayers

#endif  // DETLAYERS_NMS_BITMASK_H_
