// Runs the real CUDA NMS kernels and launch code (custom_calls/nms_cuda.cu, included below with
// DETLAYERS_CUDA_SIMULATOR) on the CPU through tests/cpp/cuda_simulator.h, and compares every
// result with a plain greedy NMS. Built and run by tests/test_cuda_simulation.py (plain, TSan and
// ASan+UBSan builds); exits non-zero on the first mismatch or failed check.
//
// Usage: nms_cuda_simulator [--quick | --constants | --cases IN OUT]
//   (default)    every size and configuration below
//   --quick      smaller sizes, for the sanitizer builds
//   --constants  prints the constants that detlayers/_nms_custom_call.py must mirror, one "NAME value" a line
//   --cases      runs the problems in file IN (torchvision/detectron2 fixtures, written by the
//                test), writing each result to OUT; format in run_case_file
#include "nms_cuda.cu"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

using detlayers::bitmask::mask_words;
using detlayers::cuda_nms::NmsProblem;
using detlayers::cuda_nms::Word;

int failures = 0;

void fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  ++failures;
}

// Greedy NMS in its textbook form (every kept box sweeps all later boxes), the exact IoU for every
// pair: the specification the kernels must meet. Boxes are in score order.
std::vector<int32_t> greedy_reference(const float* boxes, const int32_t* classes, int64_t n, int dim,
                                      float threshold, int64_t k) {
  std::vector<char> removed(static_cast<size_t>(n), 0);
  std::vector<int32_t> keep;
  for (int64_t i = 0; i < n && static_cast<int64_t>(keep.size()) < k; ++i) {
    if (removed[i]) continue;
    keep.push_back(static_cast<int32_t>(i));
    const float* a = boxes + i * dim;
    for (int64_t j = i + 1; j < n; ++j) {
      if (classes && classes[j] != classes[i]) continue;
      const float* b = boxes + j * dim;
      const float iou = dim == 4 ? detlayers::box_iou(a, detlayers::box_area(a), b, detlayers::box_area(b))
                                 : detlayers::rotated_box_iou<float>(a, b);
      if (iou > threshold) removed[j] = 1;
    }
  }
  keep.resize(static_cast<size_t>(k), -1);
  return keep;
}

// Boxes in a few clusters (so that suppression chains cross tile boundaries), with exact
// duplicates and empty boxes mixed in.
std::vector<float> random_boxes(std::mt19937& rng, int64_t n, int dim) {
  std::uniform_real_distribution<float> centre(0.0f, 300.0f), jitter(-15.0f, 15.0f), side(1.0f, 60.0f),
      angle(-180.0f, 180.0f), unit(0.0f, 1.0f);
  const int clusters = 1 + static_cast<int>(n / 40);
  std::vector<float> cx(clusters), cy(clusters);
  for (int c = 0; c < clusters; ++c) cx[c] = centre(rng), cy[c] = centre(rng);
  std::vector<float> boxes(static_cast<size_t>(n * dim));
  for (int64_t i = 0; i < n; ++i) {
    float* b = boxes.data() + i * dim;
    const float u = unit(rng);
    if (i > 0 && u < 0.05f) {  // duplicate of an earlier box
      const int64_t j = static_cast<int64_t>(unit(rng) * static_cast<float>(i)) % i;
      std::copy(boxes.data() + j * dim, boxes.data() + (j + 1) * dim, b);
      continue;
    }
    const int c = static_cast<int>(unit(rng) * clusters) % clusters;
    const float x = cx[c] + jitter(rng), y = cy[c] + jitter(rng), w = side(rng), h = side(rng);
    const bool empty = u > 0.97f;
    if (dim == 4) {
      b[0] = x, b[1] = y, b[2] = empty ? x : x + w, b[3] = y + h;
    } else {
      b[0] = x, b[1] = y, b[2] = empty ? 0.0f : w, b[3] = h, b[4] = angle(rng);
    }
  }
  return boxes;
}

template <int kBoxDim, bool kClasses>
std::string launch(const NmsProblem& p, int reduce_threads) {
  return detlayers::cuda_nms::launch_nms<kBoxDim, kClasses>(nullptr, p, reduce_threads);
}

std::string dispatch(int dim, bool with_classes, const NmsProblem& p, int reduce_threads) {
  if (dim == 4) return with_classes ? launch<4, true>(p, reduce_threads) : launch<4, false>(p, reduce_threads);
  return with_classes ? launch<5, true>(p, reduce_threads) : launch<5, false>(p, reduce_threads);
}

// One launch over `batch` independent random problems; outputs and scratch start as garbage.
void run_case(int dim, bool with_classes, int64_t n, int64_t k, int64_t batch, int reduce_threads, unsigned seed) {
  std::mt19937 rng(seed);
  const float thresholds_pool[] = {0.0f, 0.3f, 0.5f, 0.7f, 1.0f};
  std::vector<float> boxes, thresholds;
  std::vector<int32_t> classes;
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<float> one = random_boxes(rng, n, dim);
    boxes.insert(boxes.end(), one.begin(), one.end());
    for (int64_t i = 0; i < n; ++i) classes.push_back(static_cast<int32_t>(rng() % 3));
    thresholds.push_back(thresholds_pool[rng() % 5]);
  }
  const int64_t tiles = (n + 63) / 64;
  std::vector<Word> mask(static_cast<size_t>(batch * mask_words(tiles)));
  std::vector<int32_t> keep(static_cast<size_t>(batch * k)), count(static_cast<size_t>(batch));
  cuda_sim::fill_garbage(mask.data(), mask.size() * sizeof(Word), seed + 1);
  cuda_sim::fill_garbage(keep.data(), keep.size() * sizeof(int32_t), seed + 2);
  cuda_sim::fill_garbage(count.data(), count.size() * sizeof(int32_t), seed + 3);
  const NmsProblem p{boxes.data(), with_classes ? classes.data() : nullptr, thresholds.data(), batch, n, k,
                     keep.data(), count.data(), mask.data(), static_cast<int64_t>(mask.size())};
  const std::string error = dispatch(dim, with_classes, p, reduce_threads);
  const std::string name = "D=" + std::to_string(dim) + (with_classes ? " classes" : "") +
                           " N=" + std::to_string(n) + " K=" + std::to_string(k) + " batch=" +
                           std::to_string(batch) + " reduce_threads=" + std::to_string(reduce_threads);
  if (!error.empty()) return fail(name + ": " + error);
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<int32_t> want =
        greedy_reference(boxes.data() + b * n * dim, with_classes ? classes.data() + b * n : nullptr, n, dim,
                         thresholds[b], k);
    int64_t want_count = 0;
    while (want_count < k && want[want_count] >= 0) ++want_count;
    if (count[b] != want_count) {
      fail(name + " problem " + std::to_string(b) + ": count " + std::to_string(count[b]) + ", expected " +
           std::to_string(want_count));
      continue;
    }
    for (int64_t s = 0; s < k; ++s) {
      if (keep[b * k + s] != want[s]) {
        fail(name + " problem " + std::to_string(b) + ": keep[" + std::to_string(s) + "] = " +
             std::to_string(keep[b * k + s]) + ", expected " + std::to_string(want[s]));
        break;
      }
    }
  }
}

void check_equal(const std::string& what, const std::string& got, const std::string& want_substring) {
  const bool ok = want_substring.empty() ? got.empty() : got.find(want_substring) != std::string::npos;
  if (!ok) fail(what + ": got \"" + got + "\", expected " + (want_substring.empty() ? "success" : "\"" + want_substring + "\""));
}

// The scratch mask: packed upper triangle only, and bounded per image.
void check_scratch_bound() {
  if (mask_words(1) != 64 || mask_words(3) != 64 * 6) fail("mask_words is not 64 * tiles * (tiles + 1) / 2");
  // 131008 boxes (2047 tiles) is the largest image within 1 GiB; one more tile is refused before
  // anything is launched (all pointers are null here).
  for (const auto& [n, batch, allowed] : {std::tuple<int64_t, int64_t, bool>{131008, 1, true},
                                          {131072, 1, false},
                                          {131072, 2, false},
                                          {65536, 4, true}}) {
    const int64_t tiles = (n + 63) / 64;
    const int64_t words = batch * mask_words(tiles);
    if ((mask_words(tiles) * 8 <= detlayers::bitmask::kMaxMaskBytes) != allowed) {
      fail("scratch bound at N=" + std::to_string(n));
    }
    if (allowed) continue;
    const NmsProblem p{nullptr, nullptr, nullptr, batch, n, n, nullptr, nullptr, nullptr, words};
    check_equal("oversized call", launch<4, false>(p, 256), "scratch bound");
  }
  const NmsProblem wrong{nullptr, nullptr, nullptr, 2, 100, 100, nullptr, nullptr, nullptr, 2 * 100 * 2};
  check_equal("unpacked workspace size", launch<4, false>(wrong, 256), "mask workspace must hold");
}

// The >48 KB opt-in counts the reduction's static shared memory: a dynamic size below 48 KB whose
// total with the static part exceeds it still needs the attribute (N ~ 390k before the scratch
// bound existed).
void check_shared_memory_opt_in() {
  const void* kernel = reinterpret_cast<const void*>(detlayers::cuda_nms::nms_reduce_kernel);
  cuda_sim::KernelState& state = cuda_sim::kernel_state(kernel);
  if (state.static_bytes == 0) return fail("the reduction kernel has not run yet");
  state.max_dynamic_bytes = 0;
  const size_t dynamic = cuda_sim::kDefaultSharedBytes - state.static_bytes + 8;
  if (cuda_sim::launch_fits(kernel, dynamic)) fail("simulator accepts a launch over 48 KB without the opt-in");
  if (detlayers::cuda_nms::prepare_reduce_shared_memory(dynamic) != cudaSuccess) fail("opt-in refused");
  if (!cuda_sim::launch_fits(kernel, dynamic)) fail("opt-in ignores the kernel's static shared memory");
  if (detlayers::cuda_nms::prepare_reduce_shared_memory(cuda_sim::kOptInSharedBytes) == cudaSuccess) {
    fail("opt-in beyond the device limit accepted");
  }
  cudaGetLastError();
  state.max_dynamic_bytes = 0;
}

// The loader's check (DetlayersNmsCudaCheckRuntime) against simulated drivers and devices.
void check_runtime_check() {
  const cuda_sim::Config saved = cuda_sim::config;
  char message[256];
  auto run = [&](const char* what, const std::string& want) {
    const int rc = DetlayersNmsCudaCheckRuntime(message, sizeof message);
    check_equal(what, message, want);
    if ((rc == 0) != want.empty()) fail(std::string(what) + ": wrong return code");
  };
  run("current driver", "");
  cuda_sim::config.driver_version = 12080;
  run("older driver", "built with CUDA 13.0 but the driver supports CUDA 12.8 only");
  cuda_sim::config.driver_version = 0;
  run("no driver", "no CUDA driver");
  cuda_sim::config = saved;
  cuda_sim::config.driver_version = 13020;  // same major, newer minor: fine
  run("newer driver", "");
  cuda_sim::config.kernel_images = false;
  cuda_sim::config.major = 7;
  cuda_sim::config.minor = 5;
  run("no kernel image", "no usable kernel image for CUDA device 0 (compute capability 7.5)");
  cuda_sim::config = saved;
  char tiny[8];
  cuda_sim::config.driver_version = 0;
  DetlayersNmsCudaCheckRuntime(tiny, sizeof tiny);
  if (std::string(tiny) != "no CUDA") fail("message not truncated to its buffer");
  cuda_sim::config = saved;
  cudaGetLastError();
}

// Subnormal areas are not flushed to zero: two identical boxes of area 1e-40 have IoU 1 (as in
// torchvision), so the second is suppressed.
void check_subnormal_areas() {
  std::vector<float> boxes = {0.0f, 0.0f, 1e-20f, 1e-20f, 0.0f, 0.0f, 1e-20f, 1e-20f, 5.0f, 5.0f, 5.0f + 1e-20f, 5.0f + 1e-20f};
  const float threshold = 0.5f;
  std::vector<Word> mask(static_cast<size_t>(mask_words(1)));
  std::vector<int32_t> keep(3), count(1);
  cuda_sim::fill_garbage(mask.data(), mask.size() * sizeof(Word), 7);
  const NmsProblem p{boxes.data(), nullptr, &threshold, 1, 3, 3, keep.data(), count.data(), mask.data(),
                     static_cast<int64_t>(mask.size())};
  check_equal("subnormal launch", launch<4, false>(p, 256), "");
  if (count[0] != 2 || keep[0] != 0 || keep[1] != 2 || keep[2] != -1) fail("subnormal areas flushed to zero");
}

// IN: int64 cases, then per case int32 dim, int32 has_classes, int64 n, int64 k, float threshold,
// float boxes[n * dim] (score order), int32 classes[n] if has_classes.
// OUT: per case int64 count, int32 keep[k]. Each case is one launch with garbage-filled buffers.
int run_case_file(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  FILE* out = std::fopen(out_path, "wb");
  if (!in || !out) return fail("cannot open the case files"), 2;
  auto read = [&](void* p, size_t bytes) { return bytes == 0 || std::fread(p, 1, bytes, in) == bytes; };
  int64_t cases = 0;
  if (!read(&cases, 8)) return fail("truncated case file"), 2;
  for (int64_t c = 0; c < cases; ++c) {
    int32_t dim = 0, has_classes = 0;
    int64_t n = 0, k = 0;
    float threshold = 0;
    if (!read(&dim, 4) || !read(&has_classes, 4) || !read(&n, 8) || !read(&k, 8) || !read(&threshold, 4)) {
      return fail("truncated case file"), 2;
    }
    std::vector<float> boxes(static_cast<size_t>(n * dim));
    std::vector<int32_t> classes(has_classes ? static_cast<size_t>(n) : 0);
    if (!read(boxes.data(), boxes.size() * 4) || !read(classes.data(), classes.size() * 4)) {
      return fail("truncated case file"), 2;
    }
    const int64_t tiles = (n + 63) / 64;
    std::vector<Word> mask(static_cast<size_t>(mask_words(tiles)));
    std::vector<int32_t> keep(static_cast<size_t>(k)), count(1);
    cuda_sim::fill_garbage(mask.data(), mask.size() * sizeof(Word), 100 + c);
    cuda_sim::fill_garbage(keep.data(), keep.size() * sizeof(int32_t), 200 + c);
    cuda_sim::fill_garbage(count.data(), sizeof(int32_t), 300 + c);
    const NmsProblem p{boxes.data(), has_classes ? classes.data() : nullptr, &threshold, 1, n, k,
                       keep.data(), count.data(), mask.data(), static_cast<int64_t>(mask.size())};
    const std::string error = dispatch(dim, has_classes != 0, p, 256);
    if (!error.empty()) fail("case " + std::to_string(c) + ": " + error);
    const int64_t count64 = count[0];
    std::fwrite(&count64, 8, 1, out);
    std::fwrite(keep.data(), 4, keep.size(), out);
  }
  std::fclose(in);
  std::fclose(out);
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--constants") {
    std::printf("CUDA_TILE %d\n", detlayers::bitmask::kTile);
    std::printf("CUDA_MAX_MASK_BYTES %lld\n", static_cast<long long>(detlayers::bitmask::kMaxMaskBytes));
    return 0;
  }
  if (mode == "--cases" && argc == 4) return run_case_file(argv[2], argv[3]);
  const bool quick = mode == "--quick";
  // --quick (sanitizer builds, ~10x slower): classes with rotated boxes only, fewer sizes and K.
  const std::vector<int64_t> sizes = quick ? std::vector<int64_t>{0, 1, 64, 65, 129}
                                           : std::vector<int64_t>{0, 1, 63, 64, 65, 127, 129, 1000};
  unsigned seed = 1;
  for (int dim : {4, 5}) {
    for (bool with_classes : {false, true}) {
      if (quick && with_classes != (dim == 5)) continue;
      for (int64_t n : sizes) {
        // K = N, a K that cuts the result short, K = 1 and K = 0 (each problem stops early).
        std::vector<int64_t> ks = {n, n / 3, std::min<int64_t>(n, 1), 0};
        if (quick) ks = {n, n / 3};
        if (n >= 1000) ks = {n / 5};
        for (int64_t k : ks) {
          const int64_t batch = (n >= 1000 || quick) ? 2 : 3;
          // 256 threads (the real block) and 2 (more tiles than threads from N = 129 up).
          for (int threads : {256, 2}) run_case(dim, with_classes, n, k, batch, threads, seed++);
        }
      }
    }
  }
  check_scratch_bound();
  check_shared_memory_opt_in();
  check_runtime_check();
  check_subnormal_areas();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("ok: %u simulated launches matched the greedy reference\n", seed - 1);
  return 0;
}
