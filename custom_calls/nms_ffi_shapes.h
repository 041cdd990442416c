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

// True when `dims` is exactly want[0 .. want_size).
inline bool same_dims(ffi::AnyBuffer::Dimensions dims, ffi::AnyBuffer::Dimensions want, size_t want_size) {
  if (dims.size() != want_size) return false;
  for (size_t i = 0; i < want_size; ++i) {
    if (dims[i] != want[i]) return false;
  }
  return true;
}

// Validates every dimension of every buffer against boxes[..., N, D] (classes[..., N] when given,
// threshold[...], keep[..., K] with K <= N, count[...]): a call built by hand with mismatched
// shapes is an error, never an out-of-bounds read or write.
inline ffi::Error check_shapes(ffi::AnyBuffer::Dimensions boxes, int64_t box_dim,
                               const ffi::AnyBuffer::Dimensions* classes, ffi::AnyBuffer::Dimensions threshold,
                               ffi::AnyBuffer::Dimensions keep, ffi::AnyBuffer::Dimensions count,
                               ProblemShape* shape) {
  if (boxes.size() < 2 || boxes.back() != box_dim) {
    return ffi::Error::InvalidArgument("detlayers nms: boxes must be [..., N, " + std::to_string(box_dim) +
                                       "], got " + dims_to_string(boxes));
  }
  const size_t lead = boxes.size() - 2;
  int64_t batch = 1;
  for (size_t i = 0; i < lead; ++i) batch *= boxes[i];
  const int64_t n = boxes[lead];
  const std::string expected = " for boxes " + dims_to_string(boxes);
  if (keep.size() != lead + 1 || !same_dims(keep.first(lead), boxes, lead)) {
    return ffi::Error::InvalidArgument("detlayers nms: keep must be [..., K], got " + dims_to_string(keep) +
                                       expected);
  }
  const int64_t k = keep.back();
  if (k < 0 || k > n) {
    return ffi::Error::InvalidArgument("detlayers nms: K must be in [0, N], got keep " + dims_to_string(keep) +
                                       expected);
  }
  if (!same_dims(threshold, boxes, lead)) {
    return ffi::Error::InvalidArgument("detlayers nms: threshold must be [...], got " + dims_to_string(threshold) +
                                       expected);
  }
  if (!same_dims(count, boxes, lead)) {
    return ffi::Error::InvalidArgument("detlayers nms: count must be [...], got " + dims_to_string(count) +
                                       expected);
  }
  if (classes != nullptr && !same_dims(*classes, boxes, lead + 1)) {
    return ffi::Error::InvalidArgument("detlayers nms: classes must be [..., N], got " + dims_to_string(*classes) +
                                       expected);
  }
  if (n > INT32_MAX) {
    return ffi::Error::InvalidArgument("detlayers nms: more than 2^31-1 boxes");
  }
  shape->batch = batch;
  shape->n = n;
  shape->k = k;
  return ffi::Error::Success();
}

// The CUDA handlers' workspace result: [..., words, 2] uint32 (pairs forming 64-bit words), with
// the leading dims of boxes[..., N, D] and `words` per problem.
inline ffi::Error check_workspace(ffi::AnyBuffer::Dimensions mask, ffi::AnyBuffer::Dimensions boxes, int64_t words) {
  const size_t lead = boxes.size() - 2;
  if (mask.size() != lead + 2 || !same_dims(mask.first(lead), boxes, lead) || mask[lead] != words || mask[lead + 1] != 2) {
    return ffi::Error::InvalidArgument("detlayers nms: mask workspace must be [..., " + std::to_string(words) +
                                       ", 2], got " + dims_to_string(mask) + " for boxes " + dims_to_string(boxes));
  }
  return ffi::Error::Success();
}

}  // namespace detlayers
