// Host test driver for custom_calls/rotated_iou.h.
//
// Usage: rotated_iou_harness {f32|f64|apart} boxes1.bin N boxes2.bin M out.bin
// The files are box_files.h's, in the chosen precision: out.bin receives the N x M IoU matrix.
// "apart" reads float32 boxes and writes float32 1 where
// rotated_discs_apart(box1, rotated_reach(box1), box2, rotated_reach(box2)), else 0.
#include <cstdio>
#include <cstring>
#include <vector>

#include "box_files.h"
#include "rotated_iou.h"

template <typename T, bool kApart = false>
static int run(char** argv) {
  return run_pairwise<T>(argv, [](const std::vector<T>& boxes1, long n, const std::vector<T>& boxes2, long m,
                                  std::vector<T>* ious) {
    for (long i = 0; i < n; ++i) {
      for (long j = 0; j < m; ++j) {
        if constexpr (kApart) {
          const float* a = &boxes1[i * 5];
          const float* b = &boxes2[j * 5];
          (*ious)[i * m + j] =
              detlayers::rotated_discs_apart(a, detlayers::rotated_reach(a), b, detlayers::rotated_reach(b))
                  ? 1.0f
                  : 0.0f;
        } else {
          (*ious)[i * m + j] = detlayers::rotated_box_iou<T>(&boxes1[i * 5], &boxes2[j * 5]);
        }
      }
    }
    return 0;
  });
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s {f32|f64|apart} boxes1.bin N boxes2.bin M out.bin\n", argv[0]);
    return 1;
  }
  if (std::strcmp(argv[1], "f32") == 0) return run<float>(argv);
  if (std::strcmp(argv[1], "f64") == 0) return run<double>(argv);
  if (std::strcmp(argv[1], "apart") == 0) return run<float, true>(argv);
  std::fprintf(stderr, "unknown precision %s\n", argv[1]);
  return 1;
}
