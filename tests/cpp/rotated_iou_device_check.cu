// CUDA check of custom_calls/rotated_iou.h: compiled with `nvcc -c` to prove the header is valid
// device code (float and double), and, on a machine with a GPU, linked and run like
// rotated_iou_harness.cc so its device results can be compared with detectron2's fixtures.
//
// Usage: rotated_iou_device_check {f32|f64} boxes1.bin N boxes2.bin M out.bin
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "box_files.h"
#include "rotated_iou.h"

template <typename T>
__global__ void pairwise_rotated_iou_kernel(const T* boxes1, long n, const T* boxes2, long m,
                                            T* ious) {
  const long k = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < n * m) {
    ious[k] = detlayers::rotated_box_iou<T>(boxes1 + 5 * (k / m), boxes2 + 5 * (k % m));
  }
}

#define CHECK_CUDA(call)                                                      \
  do {                                                                        \
    cudaError_t err = (call);                                                 \
    if (err != cudaSuccess) {                                                 \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(err));       \
      return 4;                                                               \
    }                                                                         \
  } while (0)

template <typename T>
static int run(char** argv) {
  return run_pairwise<T>(argv, [](const std::vector<T>& boxes1, long n, const std::vector<T>& boxes2, long m,
                                  std::vector<T>* ious) {
    if (ious->empty()) return 0;
    T *d1 = nullptr, *d2 = nullptr, *dout = nullptr;
    CHECK_CUDA(cudaMalloc(&d1, boxes1.size() * sizeof(T)));
    CHECK_CUDA(cudaMalloc(&d2, boxes2.size() * sizeof(T)));
    CHECK_CUDA(cudaMalloc(&dout, ious->size() * sizeof(T)));
    CHECK_CUDA(cudaMemcpy(d1, boxes1.data(), boxes1.size() * sizeof(T), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d2, boxes2.data(), boxes2.size() * sizeof(T), cudaMemcpyHostToDevice));
    const int threads = 128;
    const long blocks = (n * m + threads - 1) / threads;
    pairwise_rotated_iou_kernel<T><<<blocks, threads>>>(d1, n, d2, m, dout);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaMemcpy(ious->data(), dout, ious->size() * sizeof(T), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaFree(d1));
    CHECK_CUDA(cudaFree(d2));
    CHECK_CUDA(cudaFree(dout));
    return 0;
  });
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s {f32|f64} boxes1.bin N boxes2.bin M out.bin\n", argv[0]);
    return 1;
  }
  if (std::strcmp(argv[1], "f32") == 0) return run<float>(argv);
  if (std::strcmp(argv[1], "f64") == 0) return run<double>(argv);
  std::fprintf(stderr, "unknown precision %s\n", argv[1]);
  return 1;
}
