// Axis-aligned box IoU shared by the host (nms_cpu.cc) and device (nms_cuda.cu) NMS kernels.
//
// The arithmetic is written in exactly the order torchvision's CPU/CUDA NMS kernels use, so the
// float32 result is bit-identical to theirs (the CUDA library is compiled with --fmad=false so
// nvcc cannot contract `area_a + area_b - w * h` into a fused multiply-add).
#ifndef DETLAYERS_NMS_BOX_IOU_H_
#define DETLAYERS_NMS_BOX_IOU_H_

#ifndef DETLAYERS_HOST_DEVICE
#if defined(__CUDACC__)
#define DETLAYERS_HOST_DEVICE __host__ __device__
#else
#define DETLAYERS_HOST_DEVICE
#endif
#endif

namespace detlayers {

template <typename T>
DETLAYERS_HOST_DEVICE inline T max_of(T a, T b) {
  return (a < b) ? b : a;  // std::max's choice: the first argument unless the second is larger
}

template <typename T>
DETLAYERS_HOST_DEVICE inline T min_of(T a, T b) {
  return b < a ? b : a;  // std::min's choice
}

// Area of an (x1, y1, x2, y2) box, as torchvision computes it: (x2 - x1) * (y2 - y1).
template <typename T>
DETLAYERS_HOST_DEVICE inline T box_area(const T* b) {
  return (b[2] - b[0]) * (b[3] - b[1]);
}

// IoU of the higher-scoring box `a` (area `area_a`) with the candidate `b` (area `area_b`).
template <typename T>
DETLAYERS_HOST_DEVICE inline T box_iou(const T* a, T area_a, const T* b, T area_b) {
  const T xx1 = max_of(a[0], b[0]);
  const T yy1 = max_of(a[1], b[1]);
  const T xx2 = min_of(a[2], b[2]);
  const T yy2 = min_of(a[3], b[3]);
  const T w = max_of(T(0), xx2 - xx1);
  const T h = max_of(T(0), yy2 - yy1);
  const T inter = w * h;
  return inter / (area_a + area_b - inter);
}

}  // namespace detlayers

#endif  // DETLAYERS_NMS_BOX_IOU_H_
