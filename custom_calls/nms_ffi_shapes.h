// Buffer-shape validation shared by the NMS custom calls (nms_cpu.cc, nms_cuda.cu): both take
// boxes[..., N, D], [classes[..., N],] threshold[...] and return keep[..., K], count[...].
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace detlayers {

namespace ffi = xla::ffi;

struct ProblemShape {
  int64_t batch = 0;  // number of independent NMS problems
  int64_t n = 0;      // boxes per problem
  int64_t k = 0;      // output slots per problem
};

inline std::string dims_to_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// Validates every buffer against boxes[..., N, D]; nothing is read or written past these sizes.
inline ffi::Error check_shapes(ffi::AnyBuffer::Dimensions boxes, int64_t box_dim, const int64_t* classes_count,
                               size_t threshold_count, ffi::AnyBuffer::Dimensions keep, size_t count_count,
                               ProblemShape* shape) {
  if (boxes.size() < 2 || boxes.back() != box_dim) {
    return ffi::Error::InvalidArgument("detlayers nms: boxes must be [..., N, " + std::to_string(box_dim) +
                                       "], got " + dims_to_string(boxes));
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < boxes.size(); ++i) batch *= boxes[i];
  const int64_t n = boxes[boxes.size() - 2];
  if (keep.size() != boxes.size() - 1) {
    return ffi::Error::InvalidArgument("detlayers nms: keep must be [..., K], got " + dims_to_string(keep));
  }
  const int64_t k = keep.back();
  if (k > n) {
    return ffi::Error::InvalidArgument("detlayers nms: K must be <= N");
  }
  if (static_cast<int64_t>(threshold_count) != batch || static_cast<int64_t>(count_count) != batch) {
    return ffi::Error::InvalidArgument("detlayers nms: threshold and count need one entry per problem");
  }
  if (classes_count != nullptr && *classes_count != batch * n) {
    return ffi::Error::InvalidArgument("detlayers nms: classes must be [..., N]");
  }
  if (n > INT32_MAX) {
    return ffi::Error::InvalidArgument("detlayers nms: more than 2^31-1 boxes");
  }
  shape->batch = batch;
  shape->n = n;
  shape->k = k;
  return ffi::Error::Success();
}

}  // namespace detlayers
