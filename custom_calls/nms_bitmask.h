// The two steps of bitmask NMS, written once for the CUDA kernels (nms_cuda.cu) and for a host
// emulation used by the tests (tests/cpp/nms_bitmask_harness.cc), which runs every thread's work
// sequentially in the same order so the algorithm can be checked on machines without a GPU.
//
// Boxes are sorted by decreasing score. Word (i, c) of the mask has bit j set when box i suppresses
// box 64*c + j (IoU(i, that box) > threshold, same class, and 64*c + j > i). Only words with
// c >= i / 64 are ever computed or read.
#ifndef DETLAYERS_NMS_BITMASK_H_
#define DETLAYERS_NMS_BITMASK_H_

#include <math.h>
#include <stdint.h>

#include "nms_box_iou.h"
#include "rotated_iou.h"

namespace detlayers {
namespace bitmask {

constexpr int kTile = 64;  // boxes per mask word
using Word = unsigned long long;

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

// Word c of the "removed" set after the boxes `kept` (bits of tile `tile`, rows base + j) are
// applied: what the reduction's threads do for every later tile c.
DETLAYERS_HOST_DEVICE inline Word merge_kept_rows(Word removed_c, Word kept, const Word* mask, int64_t base,
                                                  int64_t tiles, int64_t c) {
  for (Word bits = kept; bits != 0; bits &= bits - 1) {
#if defined(__CUDA_ARCH__)
    const int j = __ffsll(static_cast<long long>(bits)) - 1;
#else
    const int j = __builtin_ctzll(bits);
#endif
    removed_c |= mask[(base + j) * tiles + c];
  }
  return removed_c;
}

}  // namespace bitmask
}  // namespace detlayers

#endif  // DETLAYERS_NMS_BITMASK_H_
