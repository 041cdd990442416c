// CPU XLA custom calls (typed FFI) for greedy non-maximum suppression.
//
// Contract shared with detlayers/_nms_custom_call.py (detlayers/nms.py sorts by score in XLA before
// the call):
//   boxes     f32[..., N, D]   D = 4 (x1, y1, x2, y2) or 5 (xc, yc, w, h, angle_degrees),
//                              already ordered by decreasing score
//   classes   s32[..., N]      (batched variants only) boxes of different classes never interact
//   threshold f32[...]         a box is suppressed when IoU(kept, box) > threshold
// results:
//   keep      s32[..., K]      positions (into the sorted order) of the kept boxes, ascending,
//                              slots >= count hold -1; K <= N is the max_output_size
//   count     s32[...]         number of kept boxes (<= K)
// Leading dimensions are a batch of independent problems (vmap lowers to one call).
//
// Greedy NMS keeps box i iff no *kept* box before it overlaps it by more than the threshold, so
// instead of torchvision's "each kept box sweeps all later boxes" loop we test each candidate
// against the (short, contiguous) list of boxes kept so far and stop at the first suppressor.
// Same result, far fewer IoU evaluations when most boxes are suppressed, and the loop can stop as
// soon as K boxes are kept.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "nms_box_iou.h"
#include "nms_ffi_shapes.h"
#include "rotated_iou.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace ffi = xla::ffi;

namespace detlayers {
namespace {

// XLA's CPU runtime runs its computations, and so this handler, with subnormal floats flushed to
// zero (x86 MXCSR FTZ/DAZ, aarch64 FPCR.FZ). torchvision does not flush: two identical boxes of
// area 1e-40 have IoU 1 there, but 0/0 = NaN (never suppressed) under flushing. The handler
// restores IEEE subnormals for its duration so that its result is torchvision's.
class ScopedSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  ScopedSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFlushBits); }
  ~ScopedSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) | DAZ (bit 6)
  unsigned saved_;
#elif defined(__aarch64__)
  ScopedSubnormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    asm volatile("msr fpcr, %0" : : "r"(saved_ & ~kFlushBit));
  }
  ~ScopedSubnormals() { asm volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  static constexpr uint64_t kFlushBit = uint64_t{1} << 24;  // FPCR.FZ
  uint64_t saved_;
#endif
  ScopedSubnormals(const ScopedSubnormals&) = delete;
  ScopedSubnormals& operator=(const ScopedSubnormals&) = delete;
};

// Boxes kept so far, structure-of-arrays so the overlap test vectorizes.
struct AxisKept {
  std::vector<float> x1, y1, x2, y2, area;
  int64_t size = 0;
  void reset(int64_t capacity) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->resize(static_cast<size_t>(capacity));
    size = 0;
  }
};

// True if a box already in `kept` overlaps the candidate `b` by more than `threshold`.
inline bool axis_suppressed(const AxisKept& kept, const float* b, float b_area, float threshold) {
  constexpr int64_t kChunk = 16;  // branch-free chunks (vectorizable), early exit between chunks
  const float bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
  for (int64_t start = 0; start < kept.size; start += kChunk) {
    const int64_t stop = std::min(kept.size, start + kChunk);
    int hit = 0;
    for (int64_t j = start; j < stop; ++j) {
      // Same operations, same order as nms_box_iou.h's box_iou(kept_j, b).
      const float xx1 = max_of(kept.x1[j], bx1);
      const float yy1 = max_of(kept.y1[j], by1);
      const float xx2 = min_of(kept.x2[j], bx2);
      const float yy2 = min_of(kept.y2[j], by2);
      const float w = max_of(0.0f, xx2 - xx1);
      const float h = max_of(0.0f, yy2 - yy1);
      const float inter = w * h;
      const float iou = inter / (kept.area[j] + b_area - inter);
      hit |= static_cast<int>(iou > threshold);
    }
    if (hit) return true;
  }
  return false;
}

// Greedy NMS over the boxes at `positions[0..m)` (ascending = decreasing score). Kept positions
// are passed to `emit` until it returns false.
template <typename Emit>
void greedy_axis(const float* boxes, const int32_t* positions, int64_t m, float threshold, AxisKept& kept,
                 Emit&& emit) {
  kept.reset(m);
  for (int64_t t = 0; t < m; ++t) {
    const int32_t p = positions ? positions[t] : static_cast<int32_t>(t);
    const float* b = boxes + 4 * static_cast<int64_t>(p);
    const float b_area = box_area(b);
    if (axis_suppressed(kept, b, b_area, threshold)) continue;
    const int64_t s = kept.size++;
    kept.x1[s] = b[0];
    kept.y1[s] = b[1];
    kept.x2[s] = b[2];
    kept.y2[s] = b[3];
    kept.area[s] = b_area;
    if (!emit(p)) return;
  }
}

// Kept rotated boxes and their reach (rotated_iou.h): pairs whose discs are apart have IoU 0
// without evaluating the polygon intersection.
struct RotatedKept {
  std::vector<float> boxes;  // 5 floats per kept box
  std::vector<float> reach;
  int64_t size = 0;
  void reset(int64_t capacity) {
    boxes.resize(static_cast<size_t>(5 * capacity));
    reach.resize(static_cast<size_t>(capacity));
    size = 0;
  }
};

template <typename Emit>
void greedy_rotated(const float* boxes, const int32_t* positions, int64_t m, float threshold,
                    RotatedKept& kept, Emit&& emit) {
  kept.reset(m);
  for (int64_t t = 0; t < m; ++t) {
    const int32_t p = positions ? positions[t] : static_cast<int32_t>(t);
    const float* b = boxes + 5 * static_cast<int64_t>(p);
    const float b_reach = rotated_reach(b);
    // detectron2's rule for pairs whose discs cannot meet: IoU 0, so they suppress iff 0 > t
    // (only for a negative traced threshold).
    const bool apart_suppresses = 0.0f > threshold;
    bool suppressed = false;
    for (int64_t j = 0; j < kept.size && !suppressed; ++j) {
      const float* a = kept.boxes.data() + 5 * j;
      suppressed = rotated_discs_apart(a, kept.reach[j], b, b_reach)
                       ? apart_suppresses
                       : rotated_box_iou<float>(a, b) > threshold;
    }
    if (suppressed) continue;
    const int64_t s = kept.size++;
    std::copy(b, b + 5, kept.boxes.data() + 5 * s);
    kept.reach[s] = b_reach;
    if (!emit(p)) return;
  }
}

// Runs one problem: without classes one greedy pass that stops at K kept boxes; with classes the
// positions are grouped by class (stable, so each group stays in score order), each group is
// suppressed on its own, and the kept flags are read back in score order.
template <int kBoxDim, typename Kept>
void run_problem(const float* boxes, const int32_t* classes, int64_t n, int64_t k, float threshold,
                 Kept& kept, std::vector<int32_t>& order, std::vector<uint8_t>& flags, int32_t* keep_out,
                 int32_t* count_out) {
  int64_t count = 0;
  auto greedy = [&](const int32_t* positions, int64_t m, auto&& emit) {
    if constexpr (kBoxDim == 5) {
      greedy_rotated(boxes, positions, m, threshold, kept, emit);
    } else {
      greedy_axis(boxes, positions, m, threshold, kept, emit);
    }
  };
  if (k > 0) {
    if (classes == nullptr) {
      greedy(nullptr, n, [&](int32_t p) {
        keep_out[count++] = p;
        return count < k;
      });
    } else {
      order.resize(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [classes](int32_t a, int32_t b) { return classes[a] < classes[b]; });
      flags.assign(static_cast<size_t>(n), 0);
      for (int64_t start = 0; start < n;) {
        int64_t stop = start + 1;
        while (stop < n && classes[order[stop]] == classes[order[start]]) ++stop;
        greedy(order.data() + start, stop - start, [&](int32_t p) {
          flags[p] = 1;
          return true;
        });
        start = stop;
      }
      for (int64_t p = 0; p < n && count < k; ++p) {
        if (flags[p]) keep_out[count++] = static_cast<int32_t>(p);
      }
    }
  }
  std::fill(keep_out + count, keep_out + k, -1);
  *count_out = static_cast<int32_t>(count);
}

template <int kBoxDim, typename Kept>
ffi::Error nms_impl(ffi::Buffer<ffi::F32> boxes, const int32_t* classes, const ffi::AnyBuffer::Dimensions* classes_dims,
                    ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> keep,
                    ffi::ResultBuffer<ffi::S32> count) {
  ProblemShape shape;
  if (ffi::Error err = check_shapes(boxes.dimensions(), kBoxDim, classes_dims, threshold.dimensions(),
                                    keep->dimensions(), count->dimensions(), &shape);
      err.failure()) {
    return err;
  }
  const ScopedSubnormals subnormals;
  Kept kept;
  std::vector<int32_t> order;
  std::vector<uint8_t> flags;
  for (int64_t b = 0; b < shape.batch; ++b) {
    run_problem<kBoxDim>(boxes.typed_data() + b * shape.n * kBoxDim,
                         classes ? classes + b * shape.n : nullptr, shape.n, shape.k,
                         threshold.typed_data()[b], kept, order, flags, keep->typed_data() + b * shape.k,
                         count->typed_data() + b);
  }
  return ffi::Error::Success();
}

// The XLA handlers differ only in the box type (D and its IoU) and in whether classes are passed.
template <int kBoxDim, typename Kept>
ffi::Error nms_plain(ffi::Buffer<ffi::F32> boxes, ffi::Buffer<ffi::F32> threshold,
                     ffi::ResultBuffer<ffi::S32> keep, ffi::ResultBuffer<ffi::S32> count) {
  return nms_impl<kBoxDim, Kept>(boxes, nullptr, nullptr, threshold, keep, count);
}

template <int kBoxDim, typename Kept>
ffi::Error nms_with_classes(ffi::Buffer<ffi::F32> boxes, ffi::Buffer<ffi::S32> classes,
                            ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> keep,
                            ffi::ResultBuffer<ffi::S32> count) {
  const ffi::AnyBuffer::Dimensions classes_dims = classes.dimensions();
  return nms_impl<kBoxDim, Kept>(boxes, classes.typed_data(), &classes_dims, threshold, keep, count);
}

}  // namespace
}  // namespace detlayers

// (boxes, [classes,] threshold) -> (keep, count); the template arguments are parenthesised so
// that their comma does not split the macro argument.
#define DETLAYERS_NMS_CPU_BINDING(...)          \
  ffi::Ffi::Bind()                              \
      .Arg<ffi::Buffer<ffi::F32>>() __VA_ARGS__ \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::S32>>()             \
      .Ret<ffi::Buffer<ffi::S32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersNmsCpu, (detlayers::nms_plain<4, detlayers::AxisKept>),
                              DETLAYERS_NMS_CPU_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersBatchedNmsCpu, (detlayers::nms_with_classes<4, detlayers::AxisKept>),
                              DETLAYERS_NMS_CPU_BINDING(.Arg<ffi::Buffer<ffi::S32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersNmsRotatedCpu, (detlayers::nms_plain<5, detlayers::RotatedKept>),
                              DETLAYERS_NMS_CPU_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetlayersBatchedNmsRotatedCpu,
                              (detlayers::nms_with_classes<5, detlayers::RotatedKept>),
                              DETLAYERS_NMS_CPU_BINDING(.Arg<ffi::Buffer<ffi::S32>>()));
