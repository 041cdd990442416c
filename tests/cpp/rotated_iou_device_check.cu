// Compile-only check that custom_calls/rotated_iou.h is valid CUDA device code (float and double).
#include "rotated_iou.h"

template <typename T>
__global__ void pairwise_rotated_iou_kernel(const T* boxes1, int n, const T* boxes2, int m,
                                            T* ious) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < n * m) {
    ious[k] = detlayers::rotated_box_iou<T>(boxes1 + 5 * (k / m), boxes2 + 5 * (k % m));
  }
}

template __global__ void pairwise_rotated_iou_kernel<float>(const float*, int, const float*, int,
                                                            float*);
template __global__ void pairwise_rotated_iou_kernel<double>(const double*, int, const double*,
                                                             int, double*);
