// Host test driver for custom_calls/rotated_iou.h.
//
// Usage: rotated_iou_harness {f32|f64|apart} boxes1.bin N boxes2.bin M out.bin
// The .bin files hold raw little-endian rows of 5 values in the chosen precision; out.bin receives
// the N x M IoU matrix (row-major) in the same precision. "apart" reads float32 boxes and writes
// float32 1 where rotated_discs_apart(box1, rotated_reach(box1), box2, rotated_reach(box2)), else 0.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "rotated_iou.h"

template <typename T>
static bool read_rows(const char* path, long rows, std::vector<T>* values) {
  values->resize(static_cast<size_t>(rows) * 5);
  if (rows == 0) return true;
  FILE* f = std::fopen(path, "rb");
  if (!f) return false;
  const size_t got = std::fread(values->data(), sizeof(T), values->size(), f);
  std::fclose(f);
  return got == values->size();
}

template <typename T, bool kApart = false>
static int run(char** argv) {
  const long n = std::atol(argv[3]);
  const long m = std::atol(argv[5]);
  std::vector<T> boxes1, boxes2;
  if (!read_rows(argv[2], n, &boxes1) || !read_rows(argv[4], m, &boxes2)) {
    std::fprintf(stderr, "cannot read box files\n");
    return 2;
  }
  std::vector<T> ious(static_cast<size_t>(n) * m);
  for (long i = 0; i < n; ++i) {
    for (long j = 0; j < m; ++j) {
      if constexpr (kApart) {
        const float* a = &boxes1[i * 5];
        const float* b = &boxes2[j * 5];
        ious[i * m + j] =
            detlayers::rotated_discs_apart(a, detlayers::rotated_reach(a), b, detlayers::rotated_reach(b))
                ? 1.0f
                : 0.0f;
      } else {
        ious[i * m + j] = detlayers::rotated_box_iou<T>(&boxes1[i * 5], &boxes2[j * 5]);
      }
    }
  }
  FILE* f = std::fopen(argv[6], "wb");
  if (!f) return 3;
  std::fwrite(ious.data(), sizeof(T), ious.size(), f);
  std::fclose(f);
  return 0;
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
