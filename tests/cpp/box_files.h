// Box-file I/O shared by the rotated-IoU test drivers (rotated_iou_harness.cc and
// rotated_iou_device_check.cu), whose command line is
//   <driver> <mode> boxes1.bin N boxes2.bin M out.bin
// The .bin files hold raw little-endian rows of 5 values of type T; out.bin receives the N x M
// matrix (row-major) of T.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <vector>

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

// Reads the two box files named by argv, lets `fill(boxes1, n, boxes2, m, &out)` compute the
// N x M matrix (a nonzero return is the driver's exit status), and writes it to argv[6].
template <typename T, typename Fill>
static int run_pairwise(char** argv, Fill fill) {
  const long n = std::atol(argv[3]);
  const long m = std::atol(argv[5]);
  std::vector<T> boxes1, boxes2;
  if (!read_rows(argv[2], n, &boxes1) || !read_rows(argv[4], m, &boxes2)) {
    std::fprintf(stderr, "cannot read box files\n");
    return 2;
  }
  std::vector<T> out(static_cast<size_t>(n) * m);
  const int status = fill(boxes1, n, boxes2, m, &out);
  if (status != 0) return status;
  FILE* f = std::fopen(argv[6], "wb");
  if (!f) return 3;
  std::fwrite(out.data(), sizeof(T), out.size(), f);
  std::fclose(f);
  return 0;
}
