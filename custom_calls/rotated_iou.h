// IoU of two rotated rectangles, usable from host C++ and from CUDA device code; the same
// float32 operations, in the same order, as detlayers/rotated_boxes.py, so that the C++ CPU
// kernel, the CUDA kernel and the pure-XLA path give bit-identical IoUs (hence identical NMS
// results). How it is computed: docs/design/rotated_iou.md.
//
// A box is (x_center, y_center, width, height, angle_degrees); a positive angle turns the box
// counter-clockwise as seen on screen (image y axis points down).
//
// rotated_box_iou returns detectron2's float32 value (pairwise_iou_rotated, step for step), clamped
// to [0, 1], whenever it is within kSoundTolerance of the exact IoU, and otherwise the exact IoU
// (float32, within a few ulps of area of the true value). IoU is 0 when either area w * h is
// below 1e-14. rotated_reach / rotated_discs_apart are the one C++ definition of the rule that
// lets callers skip pairs whose IoU is exactly 0.
//
// Constraints: header only, no STL, no exceptions, no dynamic memory, fixed-size local arrays.
// T = float is the production type; T = double is supported for tests (double trigonometry).
// Rounding: host code must be built without FMA contraction (-ffp-contract=off); device code
// prevents contraction itself (rounded_product).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DETLAYERS_HOST_DEVICE __host__ __device__
#else
#define DETLAYERS_HOST_DEVICE
#endif

namespace detlayers {
namespace rotated_iou_detail {

// Upper bound on candidate vertices: 4 x 4 edge crossings + 4 + 4 contained corners.
constexpr int kMaxCandidates = 24;

template <typename T>
struct Vec2 {
  T x;
  T y;
};

// a * b rounded to T before any later add uses it. nvcc contracts `a * b + c` into a fused
// multiply-add by default, which rounds once instead of twice and would make the device results
// differ from detectron2's CPU op (and from our CPU kernel) in the last bit, enough to flip its
// tolerance tests in degenerate cases; the _rn intrinsics are never contracted. On the host, build
// with -ffp-contract=off (GCC contracts by default when the target has FMA instructions).
#if defined(__CUDA_ARCH__)
DETLAYERS_HOST_DEVICE inline float rounded_product(float a, float b) { return __fmul_rn(a, b); }
DETLAYERS_HOST_DEVICE inline double rounded_product(double a, double b) { return __dmul_rn(a, b); }
#else
DETLAYERS_HOST_DEVICE inline float rounded_product(float a, float b) { return a * b; }
DETLAYERS_HOST_DEVICE inline double rounded_product(double a, double b) { return a * b; }
#endif

template <typename T>
DETLAYERS_HOST_DEVICE inline Vec2<T> make_vec(T x, T y) {
  Vec2<T> v;
  v.x = x;
  v.y = y;
  return v;
}

template <typename T>
DETLAYERS_HOST_DEVICE inline Vec2<T> minus(const Vec2<T>& a, const Vec2<T>& b) {
  return make_vec<T>(a.x - b.x, a.y - b.y);
}

// a.x * b.y - b.x * a.y, evaluated as two rounded products and one rounded difference.
template <typename T>
DETLAYERS_HOST_DEVICE inline T cross(const Vec2<T>& a, const Vec2<T>& b) {
  return rounded_product(a.x, b.y) - rounded_product(b.x, a.y);
}

template <typename T>
DETLAYERS_HOST_DEVICE inline T dot(const Vec2<T>& a, const Vec2<T>& b) {
  return rounded_product(a.x, b.x) + rounded_product(a.y, b.y);
}

template <typename T>
DETLAYERS_HOST_DEVICE inline T magnitude(T v) {
  return v < T(0) ? -v : v;
}

// sin and cos of whole degrees -50..50 as unevaluated float sums hi + lo: {sin_hi, sin_lo,
// cos_hi, cos_lo}. Must equal detlayers/rotated_boxes.py's tables (checked by the tests).
#define DETLAYERS_WHOLE_DEGREE_TABLE \
{ \
  {-0x1.8836fa0000000p-1f, -0x1.67a81c0000000p-28f, 0x1.491b760000000p-1f, -0x1.b87d3c0000000p-26f}, \
  {-0x1.82694c0000000p-1f, 0x1.6bdc7a0000000p-26f, 0x1.4fe6f80000000p-1f, 0x1.384fd40000000p-29f}, \
  {-0x1.7c7d7a0000000p-1f, -0x1.0677d80000000p-26f, 0x1.56984a0000000p-1f, -0x1.23be840000000p-26f}, \
  {-0x1.7673fe0000000p-1f, -0x1.90d3040000000p-30f, 0x1.5d2ee40000000p-1f, -0x1.9cd8f60000000p-27f}, \
  {-0x1.704d4e0000000p-1f, -0x1.a9534e0000000p-27f, 0x1.63aa440000000p-1f, -0x1.e3f19e0000000p-26f}, \
  {-0x1.6a09e60000000p-1f, -0x1.9fcef40000000p-27f, 0x1.6a09e60000000p-1f, 0x1.9fcef40000000p-27f}, \
  {-0x1.63aa440000000p-1f, 0x1.e3f19e0000000p-26f, 0x1.704d4e0000000p-1f, 0x1.a9534e0000000p-27f}, \
  {-0x1.5d2ee40000000p-1f, 0x1.9cd8f60000000p-27f, 0x1.7673fe0000000p-1f, 0x1.90d3040000000p-30f}, \
  {-0x1.56984a0000000p-1f, 0x1.23be840000000p-26f, 0x1.7c7d7a0000000p-1f, 0x1.0677d80000000p-26f}, \
  {-0x1.4fe6f80000000p-1f, -0x1.384fd40000000p-29f, 0x1.82694c0000000p-1f, -0x1.6bdc7a0000000p-26f}, \
  {-0x1.491b760000000p-1f, 0x1.b87d3c0000000p-26f, 0x1.8836fa0000000p-1f, 0x1.67a81c0000000p-28f}, \
  {-0x1.4236480000000p-1f, -0x1.121eb00000000p-27f, 0x1.8de6140000000p-1f, -0x1.5d4b9c0000000p-26f}, \
  {-0x1.3b37fc0000000p-1f, 0x1.c846d80000000p-26f, 0x1.9376260000000p-1f, -0x1.8173860000000p-26f}, \
  {-0x1.34211a0000000p-1f, 0x1.75482a0000000p-26f, 0x1.98e6c00000000p-1f, 0x1.d44f420000000p-26f}, \
  {-0x1.2cf2300000000p-1f, -0x1.1d56980000000p-27f, 0x1.9e377a0000000p-1f, -0x1.1a02d60000000p-27f}, \
  {-0x1.25abd00000000p-1f, 0x1.e0eda20000000p-27f, 0x1.a367e60000000p-1f, -0x1.ba9e2e0000000p-27f}, \
  {-0x1.1e4e880000000p-1f, -0x1.047f440000000p-27f, 0x1.a8779c0000000p-1f, 0x1.b51dd40000000p-26f}, \
  {-0x1.16daee0000000p-1f, 0x1.11f11c0000000p-26f, 0x1.ad663a0000000p-1f, 0x1.15c5fc0000000p-26f}, \
  {-0x1.0f51940000000p-1f, 0x1.5322d60000000p-29f, 0x1.b2335c0000000p-1f, 0x1.66d4a20000000p-28f}, \
  {-0x1.07b3120000000p-1f, -0x1.fbbe260000000p-30f, 0x1.b6dea20000000p-1f, -0x1.8915220000000p-29f}, \
  {-0x1.0000000000000p-1f, 0x1.0000000000000p-54f, 0x1.bb67ae0000000p-1f, 0x1.0b09960000000p-26f}, \
  {-0x1.f071ee0000000p-2f, -0x1.bdf41e0000000p-27f, 0x1.bfce280000000p-1f, -0x1.0598c80000000p-26f}, \
  {-0x1.e0bd280000000p-2f, 0x1.7b75f00000000p-27f, 0x1.c411b40000000p-1f, 0x1.eda4e00000000p-26f}, \
  {-0x1.d0e2e20000000p-2f, -0x1.689bc00000000p-27f, 0x1.c832020000000p-1f, -0x1.6169ca0000000p-28f}, \
  {-0x1.c0e45e0000000p-2f, 0x1.507e8e0000000p-28f, 0x1.cc2ebc0000000p-1f, -0x1.2a71ce0000000p-27f}, \
  {-0x1.b0c2d80000000p-2f, 0x1.190cf60000000p-27f, 0x1.d007940000000p-1f, -0x1.fa45140000000p-26f}, \
  {-0x1.a07f920000000p-2f, -0x1.061ad00000000p-30f, 0x1.d3bc3a0000000p-1f, 0x1.dfeff20000000p-26f}, \
  {-0x1.901bd20000000p-2f, -0x1.4c7fd60000000p-29f, 0x1.d74c6a0000000p-1f, -0x1.f4e6640000000p-27f}, \
  {-0x1.7f98de0000000p-2f, -0x1.dcb2d00000000p-27f, 0x1.dab7d80000000p-1f, -0x1.9a0d2a0000000p-27f}, \
  {-0x1.6ef8020000000p-2f, 0x1.8966200000000p-33f, 0x1.ddfe400000000p-1f, 0x1.dff7000000000p-26f}, \
  {-0x1.5e3a880000000p-2f, 0x1.6ebe820000000p-27f, 0x1.e11f640000000p-1f, 0x1.29168e0000000p-28f}, \
  {-0x1.4d61be0000000p-2f, 0x1.ffe6440000000p-27f, 0x1.e41b020000000p-1f, 0x1.7fd69a0000000p-26f}, \
  {-0x1.3c6ef40000000p-2f, 0x1.1a02d60000000p-27f, 0x1.e6f0e20000000p-1f, -0x1.9775600000000p-26f}, \
  {-0x1.2b637c0000000p-2f, -0x1.f07ab80000000p-27f, 0x1.e9a0c60000000p-1f, 0x1.cf7b640000000p-26f}, \
  {-0x1.1a40ae0000000p-2f, 0x1.66b8ec0000000p-29f, 0x1.ec2a7e0000000p-1f, 0x1.af3dc00000000p-28f}, \
  {-0x1.0907dc0000000p-2f, -0x1.9306900000000p-30f, 0x1.ee8dd40000000p-1f, 0x1.d22fc60000000p-27f}, \
  {-0x1.ef74c00000000p-3f, 0x1.a368dc0000000p-28f, 0x1.f0ca9a0000000p-1f, -0x1.0c8bb60000000p-30f}, \
  {-0x1.ccb3240000000p-3f, 0x1.2647320000000p-28f, 0x1.f2e0a20000000p-1f, 0x1.4e87100000000p-29f}, \
  {-0x1.a9cd9a0000000p-3f, -0x1.884b1e0000000p-28f, 0x1.f4cfc40000000p-1f, -0x1.b0bff00000000p-26f}, \
  {-0x1.86c6de0000000p-3f, 0x1.44ced80000000p-30f, 0x1.f697d60000000p-1f, 0x1.2716d80000000p-26f}, \
  {-0x1.63a1a80000000p-3f, 0x1.f48c780000000p-31f, 0x1.f838b80000000p-1f, 0x1.9023820000000p-26f}, \
  {-0x1.4060b60000000p-3f, -0x1.ea14de0000000p-29f, 0x1.f9b24a0000000p-1f, -0x1.7a03740000000p-26f}, \
  {-0x1.1d06ca0000000p-3f, 0x1.2e4c3c0000000p-28f, 0x1.fb046a0000000p-1f, 0x1.2612900000000p-26f}, \
  {-0x1.f32d440000000p-4f, -0x1.89ec5a0000000p-29f, 0x1.fc2f020000000p-1f, 0x1.688fa20000000p-27f}, \
  {-0x1.ac260a0000000p-4f, 0x1.30ea240000000p-30f, 0x1.fd31fa0000000p-1f, -0x1.60f3080000000p-26f}, \
  {-0x1.64fd6c0000000p-4f, 0x1.cf5fc00000000p-30f, 0x1.fe0d3c0000000p-1f, -0x1.7cfd4c0000000p-26f}, \
  {-0x1.1db8f60000000p-4f, -0x1.ad4a240000000p-29f, 0x1.fec0b80000000p-1f, -0x1.d1e0020000000p-26f}, \
  {-0x1.acbc740000000p-5f, -0x1.1df9220000000p-30f, 0x1.ff4c5e0000000p-1f, 0x1.a25cc40000000p-26f}, \
  {-0x1.1de58c0000000p-5f, -0x1.3efb840000000p-30f, 0x1.ffb0280000000p-1f, -0x1.d03ea60000000p-27f}, \
  {-0x1.1df0b20000000p-6f, -0x1.713ba40000000p-31f, 0x1.ffec0a0000000p-1f, -0x1.014a0e0000000p-26f}, \
  {0.0f, 0.0f, 0x1.0000000000000p+0f, 0.0f}, \
  {0x1.1df0b20000000p-6f, 0x1.713ba40000000p-31f, 0x1.ffec0a0000000p-1f, -0x1.014a0e0000000p-26f}, \
  {0x1.1de58c0000000p-5f, 0x1.3efb840000000p-30f, 0x1.ffb0280000000p-1f, -0x1.d03ea60000000p-27f}, \
  {0x1.acbc740000000p-5f, 0x1.1df9220000000p-30f, 0x1.ff4c5e0000000p-1f, 0x1.a25cc40000000p-26f}, \
  {0x1.1db8f60000000p-4f, 0x1.ad4a240000000p-29f, 0x1.fec0b80000000p-1f, -0x1.d1e0020000000p-26f}, \
  {0x1.64fd6c0000000p-4f, -0x1.cf5fc00000000p-30f, 0x1.fe0d3c0000000p-1f, -0x1.7cfd4c0000000p-26f}, \
  {0x1.ac260a0000000p-4f, -0x1.30ea240000000p-30f, 0x1.fd31fa0000000p-1f, -0x1.60f3080000000p-26f}, \
  {0x1.f32d440000000p-4f, 0x1.89ec5a0000000p-29f, 0x1.fc2f020000000p-1f, 0x1.688fa20000000p-27f}, \
  {0x1.1d06ca0000000p-3f, -0x1.2e4c3c0000000p-28f, 0x1.fb046a0000000p-1f, 0x1.2612900000000p-26f}, \
  {0x1.4060b60000000p-3f, 0x1.ea14de0000000p-29f, 0x1.f9b24a0000000p-1f, -0x1.7a03740000000p-26f}, \
  {0x1.63a1a80000000p-3f, -0x1.f48c780000000p-31f, 0x1.f838b80000000p-1f, 0x1.9023820000000p-26f}, \
  {0x1.86c6de0000000p-3f, -0x1.44ced80000000p-30f, 0x1.f697d60000000p-1f, 0x1.2716d80000000p-26f}, \
  {0x1.a9cd9a0000000p-3f, 0x1.884b1e0000000p-28f, 0x1.f4cfc40000000p-1f, -0x1.b0bff00000000p-26f}, \
  {0x1.ccb3240000000p-3f, -0x1.2647320000000p-28f, 0x1.f2e0a20000000p-1f, 0x1.4e87100000000p-29f}, \
  {0x1.ef74c00000000p-3f, -0x1.a368dc0000000p-28f, 0x1.f0ca9a0000000p-1f, -0x1.0c8bb60000000p-30f}, \
  {0x1.0907dc0000000p-2f, 0x1.9306900000000p-30f, 0x1.ee8dd40000000p-1f, 0x1.d22fc60000000p-27f}, \
  {0x1.1a40ae0000000p-2f, -0x1.66b8ec0000000p-29f, 0x1.ec2a7e0000000p-1f, 0x1.af3dc00000000p-28f}, \
  {0x1.2b637c0000000p-2f, 0x1.f07ab80000000p-27f, 0x1.e9a0c60000000p-1f, 0x1.cf7b640000000p-26f}, \
  {0x1.3c6ef40000000p-2f, -0x1.1a02d60000000p-27f, 0x1.e6f0e20000000p-1f, -0x1.9775600000000p-26f}, \
  {0x1.4d61be0000000p-2f, -0x1.ffe6440000000p-27f, 0x1.e41b020000000p-1f, 0x1.7fd69a0000000p-26f}, \
  {0x1.5e3a880000000p-2f, -0x1.6ebe820000000p-27f, 0x1.e11f640000000p-1f, 0x1.29168e0000000p-28f}, \
  {0x1.6ef8020000000p-2f, -0x1.8966200000000p-33f, 0x1.ddfe400000000p-1f, 0x1.dff7000000000p-26f}, \
  {0x1.7f98de0000000p-2f, 0x1.dcb2d00000000p-27f, 0x1.dab7d80000000p-1f, -0x1.9a0d2a0000000p-27f}, \
  {0x1.901bd20000000p-2f, 0x1.4c7fd60000000p-29f, 0x1.d74c6a0000000p-1f, -0x1.f4e6640000000p-27f}, \
  {0x1.a07f920000000p-2f, 0x1.061ad00000000p-30f, 0x1.d3bc3a0000000p-1f, 0x1.dfeff20000000p-26f}, \
  {0x1.b0c2d80000000p-2f, -0x1.190cf60000000p-27f, 0x1.d007940000000p-1f, -0x1.fa45140000000p-26f}, \
  {0x1.c0e45e0000000p-2f, -0x1.507e8e0000000p-28f, 0x1.cc2ebc0000000p-1f, -0x1.2a71ce0000000p-27f}, \
  {0x1.d0e2e20000000p-2f, 0x1.689bc00000000p-27f, 0x1.c832020000000p-1f, -0x1.6169ca0000000p-28f}, \
  {0x1.e0bd280000000p-2f, -0x1.7b75f00000000p-27f, 0x1.c411b40000000p-1f, 0x1.eda4e00000000p-26f}, \
  {0x1.f071ee0000000p-2f, 0x1.bdf41e0000000p-27f, 0x1.bfce280000000p-1f, -0x1.0598c80000000p-26f}, \
  {0x1.0000000000000p-1f, -0x1.0000000000000p-54f, 0x1.bb67ae0000000p-1f, 0x1.0b09960000000p-26f}, \
  {0x1.07b3120000000p-1f, 0x1.fbbe260000000p-30f, 0x1.b6dea20000000p-1f, -0x1.8915220000000p-29f}, \
  {0x1.0f51940000000p-1f, -0x1.5322d60000000p-29f, 0x1.b2335c0000000p-1f, 0x1.66d4a20000000p-28f}, \
  {0x1.16daee0000000p-1f, -0x1.11f11c0000000p-26f, 0x1.ad663a0000000p-1f, 0x1.15c5fc0000000p-26f}, \
  {0x1.1e4e880000000p-1f, 0x1.047f440000000p-27f, 0x1.a8779c0000000p-1f, 0x1.b51dd40000000p-26f}, \
  {0x1.25abd00000000p-1f, -0x1.e0eda20000000p-27f, 0x1.a367e60000000p-1f, -0x1.ba9e2e0000000p-27f}, \
  {0x1.2cf2300000000p-1f, 0x1.1d56980000000p-27f, 0x1.9e377a0000000p-1f, -0x1.1a02d60000000p-27f}, \
  {0x1.34211a0000000p-1f, -0x1.75482a0000000p-26f, 0x1.98e6c00000000p-1f, 0x1.d44f420000000p-26f}, \
  {0x1.3b37fc0000000p-1f, -0x1.c846d80000000p-26f, 0x1.9376260000000p-1f, -0x1.8173860000000p-26f}, \
  {0x1.4236480000000p-1f, 0x1.121eb00000000p-27f, 0x1.8de6140000000p-1f, -0x1.5d4b9c0000000p-26f}, \
  {0x1.491b760000000p-1f, -0x1.b87d3c0000000p-26f, 0x1.8836fa0000000p-1f, 0x1.67a81c0000000p-28f}, \
  {0x1.4fe6f80000000p-1f, 0x1.384fd40000000p-29f, 0x1.82694c0000000p-1f, -0x1.6bdc7a0000000p-26f}, \
  {0x1.56984a0000000p-1f, -0x1.23be840000000p-26f, 0x1.7c7d7a0000000p-1f, 0x1.0677d80000000p-26f}, \
  {0x1.5d2ee40000000p-1f, -0x1.9cd8f60000000p-27f, 0x1.7673fe0000000p-1f, 0x1.90d3040000000p-30f}, \
  {0x1.63aa440000000p-1f, -0x1.e3f19e0000000p-26f, 0x1.704d4e0000000p-1f, 0x1.a9534e0000000p-27f}, \
  {0x1.6a09e60000000p-1f, 0x1.9fcef40000000p-27f, 0x1.6a09e60000000p-1f, 0x1.9fcef40000000p-27f}, \
  {0x1.704d4e0000000p-1f, 0x1.a9534e0000000p-27f, 0x1.63aa440000000p-1f, -0x1.e3f19e0000000p-26f}, \
  {0x1.7673fe0000000p-1f, 0x1.90d3040000000p-30f, 0x1.5d2ee40000000p-1f, -0x1.9cd8f60000000p-27f}, \
  {0x1.7c7d7a0000000p-1f, 0x1.0677d80000000p-26f, 0x1.56984a0000000p-1f, -0x1.23be840000000p-26f}, \
  {0x1.82694c0000000p-1f, -0x1.6bdc7a0000000p-26f, 0x1.4fe6f80000000p-1f, 0x1.384fd40000000p-29f}, \
  {0x1.8836fa0000000p-1f, 0x1.67a81c0000000p-28f, 0x1.491b760000000p-1f, -0x1.b87d3c0000000p-26f}, \
}
static constexpr float kWholeDegreeHost[101][4] = DETLAYERS_WHOLE_DEGREE_TABLE;
#if defined(__CUDACC__)
static __constant__ float kWholeDegreeDevice[101][4] = DETLAYERS_WHOLE_DEGREE_TABLE;
#endif
#undef DETLAYERS_WHOLE_DEGREE_TABLE

DETLAYERS_HOST_DEVICE inline float whole_degree_entry(int index, int k) {
#if defined(__CUDA_ARCH__)
  return kWholeDegreeDevice[index][k];
#else
  return kWholeDegreeHost[index][k];
#endif
}

// Error-free transforms (float): a + b = s + e and a * b = p + e exactly.
DETLAYERS_HOST_DEVICE inline void two_sum(float a, float b, float* s, float* e) {
  *s = a + b;
  const float bb = *s - a;
  *e = (a - (*s - bb)) + (b - bb);
}

DETLAYERS_HOST_DEVICE inline void split(float a, float* hi, float* lo) {
  const float c = rounded_product(4097.0f, a);
  *hi = c - (c - a);
  *lo = a - *hi;
}

DETLAYERS_HOST_DEVICE inline void two_product(float a, float b, float* p, float* e) {
  *p = rounded_product(a, b);
  float ah, al, bh, bl;
  split(a, &ah, &al);
  split(b, &bh, &bl);
  *e = (((rounded_product(ah, bh) - *p) + rounded_product(ah, bl)) + rounded_product(al, bh)) +
       rounded_product(al, bl);
}

// pi / 180 and detectron2's deficit from it (pi / 180 - 0.01745329251), as float hi + lo.
constexpr float kDegToRadHi = static_cast<float>(3.14159265358979323846 / 180.0);
constexpr float kDegToRadLo =
    static_cast<float>(3.14159265358979323846 / 180.0 - static_cast<double>(kDegToRadHi));
constexpr double kDeficit = 3.14159265358979323846 / 180.0 - 0.01745329251;
constexpr float kDeficitHi = static_cast<float>(kDeficit);
constexpr float kDeficitLo = static_cast<float>(kDeficit - static_cast<double>(kDeficitHi));

// cos and sin of angle * 0.01745329251 (detectron2's truncated radians) when `truncated`, else of
// angle * pi / 180 (exact at multiples of 90 degrees), rounded to float without double
// arithmetic: the same steps as rotated_boxes.py's _cos_sin_degrees.
DETLAYERS_HOST_DEVICE inline void cos_sin_degrees(float angle, bool truncated, float* cos_out,
                                                  float* sin_out) {
  const float reduced = fmodf(angle, 360.0f);
  const float quadrant = rintf(reduced / 90.0f);
  const float remainder = reduced - quadrant * 90.0f;
  const float whole = rintf(remainder);
  const float fraction = remainder - whole;

  float frac_rad, frac_err;
  two_product(fraction, kDegToRadHi, &frac_rad, &frac_err);
  const float frac_rest = frac_err + rounded_product(fraction, kDegToRadLo);
  float psi, psi_err;
  if (truncated) {
    float deficit, deficit_err;
    two_product(angle, kDeficitHi, &deficit, &deficit_err);
    two_sum(frac_rad, -deficit, &psi, &psi_err);
    const float deficit_rest = deficit_err + rounded_product(angle, kDeficitLo);
    psi_err = psi_err + (frac_rest - deficit_rest);
  } else {
    psi = frac_rad;
    psi_err = frac_rest;
  }
  {
    const float hi = psi, lo = psi_err;
    two_sum(hi, lo, &psi, &psi_err);
  }
  const float psi_sq = rounded_product(psi, psi);
  const float psi_cubed = rounded_product(psi_sq, psi);
  const float sin_tail =
      psi_err - rounded_product(psi_cubed, 1.0f / 6.0f - psi_sq / 120.0f);
  const float psi_fourth = rounded_product(psi_sq, psi_sq);
  const float one_minus_cos =
      (rounded_product(psi_sq, 0.5f) + rounded_product(psi, psi_err)) - psi_fourth / 24.0f;

  int index = static_cast<int>(whole) + 50;
  index = index < 0 ? 0 : (index > 100 ? 100 : index);
  const float sin_hi = whole_degree_entry(index, 0), sin_lo = whole_degree_entry(index, 1);
  const float cos_hi = whole_degree_entry(index, 2), cos_lo = whole_degree_entry(index, 3);

  // base * cos(psi) + sign * other * sin(psi), the two large terms summed exactly.
  auto rotate = [&](float base_hi, float base_lo, float other_hi, float other_lo, float sign) {
    float lead, lead_err, total, total_err;
    two_product(other_hi, psi, &lead, &lead_err);
    two_sum(base_hi, sign * lead, &total, &total_err);
    const float small =
        (base_lo - rounded_product(base_hi, one_minus_cos)) +
        sign * ((lead_err + rounded_product(other_hi, sin_tail)) + rounded_product(other_lo, psi));
    return total + (total_err + small);
  };
  const float s = rotate(sin_hi, sin_lo, cos_hi, cos_lo, 1.0f);
  const float c = rotate(cos_hi, cos_lo, sin_hi, sin_lo, -1.0f);
  const int q = ((static_cast<int>(quadrant) % 4) + 4) % 4;
  *cos_out = q == 0 ? c : (q == 1 ? -s : (q == 2 ? -c : s));
  *sin_out = q == 0 ? s : (q == 1 ? c : (q == 2 ? -s : -c));
}

// Tests only: double precision trigonometry.
DETLAYERS_HOST_DEVICE inline void cos_sin_degrees(double angle, bool truncated, double* cos_out,
                                                  double* sin_out) {
  const double radians = angle * (truncated ? 0.01745329251 : 3.14159265358979323846 / 180.0);
  *cos_out = cos(radians);
  *sin_out = sin(radians);
}

// Corners in the order (+w/2,+h/2), (+w/2,-h/2), (-w/2,-h/2), (-w/2,+h/2) of the box frame, whose
// width axis is (cos a, -sin a) and height axis (sin a, cos a) in image coordinates.
template <typename T>
DETLAYERS_HOST_DEVICE inline void box_corners(T cx, T cy, T w, T h, T cos_a, T sin_a,
                                              Vec2<T> (&corners)[4]) {
  const T half_cos = cos_a * T(0.5);
  const T half_sin = sin_a * T(0.5);
  const T sin_h = rounded_product(half_sin, h);
  const T cos_w = rounded_product(half_cos, w);
  const T cos_h = rounded_product(half_cos, h);
  const T sin_w = rounded_product(half_sin, w);
  corners[0].x = cx + sin_h + cos_w;
  corners[0].y = cy + cos_h - sin_w;
  corners[1].x = cx - sin_h + cos_w;
  corners[1].y = cy - cos_h - sin_w;
  // The opposite corners are reflections through the centre.
  corners[2].x = T(2) * cx - corners[0].x;
  corners[2].y = T(2) * cy - corners[0].y;
  corners[3].x = T(2) * cx - corners[1].x;
  corners[3].y = T(2) * cy - corners[1].y;
}

// Appends to `out` every corner of `points` that lies (within slack) inside rectangle `rect`.
template <typename T>
DETLAYERS_HOST_DEVICE inline int append_contained_corners(const Vec2<T> (&points)[4],
                                                          const Vec2<T> (&rect)[4],
                                                          const Vec2<T> (&rect_edges)[4],
                                                          Vec2<T> (&out)[kMaxCandidates],
                                                          int count) {
  const double slack = 1e-5;
  const Vec2<T>& side_a = rect_edges[0];  // rect[0] -> rect[1]
  const Vec2<T>& side_b = rect_edges[3];  // rect[3] -> rect[0]
  const T side_a_sq = dot(side_a, side_a);
  const T side_b_sq = dot(side_b, side_b);
  for (int i = 0; i < 4; ++i) {
    const Vec2<T> offset = minus(points[i], rect[0]);
    const T along_a = dot(offset, side_a);
    const T along_b = -dot(offset, side_b);
    if (along_a > -slack && along_b > -slack && along_a < side_a_sq + slack &&
        along_b < side_b_sq + slack) {
      out[count++] = points[i];
    }
  }
  return count;
}

// Candidate vertices of the intersection polygon, in the reference order; returns their number.
template <typename T>
DETLAYERS_HOST_DEVICE inline int intersection_candidates(const Vec2<T> (&corners1)[4],
                                                         const Vec2<T> (&corners2)[4],
                                                         Vec2<T> (&out)[kMaxCandidates]) {
  Vec2<T> edges1[4];
  Vec2<T> edges2[4];
  for (int i = 0; i < 4; ++i) {
    edges1[i] = minus(corners1[(i + 1) & 3], corners1[i]);
    edges2[i] = minus(corners2[(i + 1) & 3], corners2[i]);
  }
  // Accepting crossings slightly outside the segments may add near-duplicates (harmless to the
  // hull) but never drops a true vertex, which would change the area a lot.
  const double slack = 1e-5;
  int count = 0;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      const T det = cross(edges2[j], edges1[i]);
      if (magnitude(det) <= 1e-14) {
        continue;  // parallel edges
      }
      const Vec2<T> between = minus(corners2[j], corners1[i]);
      const T s = cross(edges2[j], between) / det;  // along edges1[i]
      const T u = cross(edges1[i], between) / det;  // along edges2[j]
      if (s > -slack && s < T(1) + slack && u > -slack && u < T(1) + slack) {
        out[count].x = corners1[i].x + rounded_product(edges1[i].x, s);
        out[count].y = corners1[i].y + rounded_product(edges1[i].y, s);
        ++count;
      }
    }
  }
  count = append_contained_corners(corners1, corners2, edges2, out, count);
  count = append_contained_corners(corners2, corners1, edges1, out, count);
  return count;
}

// Area of the convex hull of points[0..count) (count >= 3), by a Graham scan.
template <typename T>
DETLAYERS_HOST_DEVICE inline T convex_hull_area(const Vec2<T> (&points)[kMaxCandidates],
                                                int count) {
  // Pivot: lowest y, then lowest x; the first such point wins.
  int pivot = 0;
  for (int i = 1; i < count; ++i) {
    if (points[i].y < points[pivot].y ||
        (points[i].y == points[pivot].y && points[i].x < points[pivot].x)) {
      pivot = i;
    }
  }
  Vec2<T> rel[kMaxCandidates];  // points relative to the pivot; the pivot itself goes to slot 0
  T dist_sq[kMaxCandidates];
  for (int i = 0; i < count; ++i) {
    rel[i] = minus(points[i], points[pivot]);
  }
  const Vec2<T> first = rel[0];
  rel[0] = rel[pivot];
  rel[pivot] = first;
  for (int i = 0; i < count; ++i) {
    dist_sq[i] = dot(rel[i], rel[i]);
  }

  // Exchange sort by polar angle around the pivot (counter-clockwise in these coordinates);
  // nearly collinear points are ordered nearest first.
  for (int i = 1; i < count - 1; ++i) {
    for (int j = i + 1; j < count; ++j) {
      const T turn = cross(rel[i], rel[j]);
      if (turn < -1e-6 || (magnitude(turn) < 1e-6 && dist_sq[i] > dist_sq[j])) {
        const Vec2<T> p = rel[i];
        rel[i] = rel[j];
        rel[j] = p;
        const T d = dist_sq[i];
        dist_sq[i] = dist_sq[j];
        dist_sq[j] = d;
      }
    }
  }

  // The hull needs a second point distinct from the pivot.
  int second = 1;
  while (second < count && !(dist_sq[second] > 1e-8)) {
    ++second;
  }
  if (second == count) {
    return T(0);  // every candidate coincides with the pivot
  }
  Vec2<T> hull[kMaxCandidates];
  hull[0] = rel[0];
  hull[1] = rel[second];
  int size = 2;
  for (int i = second + 1; i < count; ++i) {
    // Pop while the last hull edge does not turn strictly left towards rel[i]. The two products
    // are compared directly (not subtracted) so a fused multiply-add cannot make equal products
    // look different.
    while (size > 1) {
      const Vec2<T> to_new = minus(rel[i], hull[size - 2]);
      const Vec2<T> to_last = minus(hull[size - 1], hull[size - 2]);
      if (rounded_product(to_new.x, to_last.y) >= rounded_product(to_last.x, to_new.y)) {
        --size;
      } else {
        break;
      }
    }
    hull[size++] = rel[i];
  }
  if (size <= 2) {
    return T(0);
  }
  // Fan of triangles from hull[0] (the pivot, at the origin).
  T twice_area = T(0);
  for (int i = 1; i < size - 1; ++i) {
    twice_area += magnitude(cross(minus(hull[i], hull[0]), minus(hull[i + 1], hull[0])));
  }
  return static_cast<T>(twice_area / 2.0);
}

template <typename T>
DETLAYERS_HOST_DEVICE inline T clamp_to(T x, T lo, T hi) {
  const T at_least = x < lo ? lo : x;
  return at_least > hi ? hi : at_least;
}

// Signed integral of clamp(y, -half_h, half_h) + half_h dx along the segment p -> q, restricted to
// |x| <= half_w: one edge's share of a polygon's area inside the box [-half_w, half_w] x
// [-half_h, half_h] (Green's theorem; the shares of a closed outline sum to +-that area).
template <typename T>
DETLAYERS_HOST_DEVICE inline T band_integral(T px, T py, T qx, T qy, T half_w, T half_h) {
  const T zero = T(0), one = T(1);
  const T span_x = qx - px;
  if (!(span_x != zero)) return zero;
  const T xa = clamp_to(px, -half_w, half_w);
  const T xb = clamp_to(qx, -half_w, half_w);
  const T ta = (xa - px) / span_x;
  const T tb = (xb - px) / span_x;
  const T span_y = qy - py;
  const T ya = py + rounded_product(ta, span_y);
  const T yb = py + rounded_product(tb, span_y);
  const T rise = yb - ya;
  T inside, above;
  if (rise != zero) {
    const T t_low = clamp_to((-half_h - ya) / rise, zero, one);
    const T t_high = clamp_to((half_h - ya) / rise, zero, one);
    const T t_enter = t_low < t_high ? t_low : t_high;
    const T t_leave = t_low < t_high ? t_high : t_low;
    inside = t_leave - t_enter;
    above = rise > zero ? one - t_leave : t_enter;
  } else {
    inside = magnitude(ya) <= half_h ? one : zero;
    above = ya > half_h ? one : zero;
  }
  const T mean_inside =
      (clamp_to(ya, -half_h, half_h) + clamp_to(yb, -half_h, half_h)) * T(0.5) + half_h;
  const T height = rounded_product(inside, mean_inside) + rounded_product(above, half_h + half_h);
  return rounded_product(xb - xa, height);
}

// IoU exact up to rounding: box 2's outline in box 1's frame, integrated against box 1's rectangle.
// (c, s): cos and sin of the exact radians.
template <typename T>
DETLAYERS_HOST_DEVICE inline T exact_iou(const T* box1, T c1, T s1, T area1, const T* box2, T c2,
                                         T s2, T area2) {
  const T dx = box2[0] - box1[0], dy = box2[1] - box1[1];
  const T cx = rounded_product(dx, c1) - rounded_product(dy, s1);
  const T cy = rounded_product(dx, s1) + rounded_product(dy, c1);
  const T ux = rounded_product(c2, c1) + rounded_product(s2, s1);
  const T uy = rounded_product(c2, s1) - rounded_product(s2, c1);
  const T half_w2 = box2[2] * T(0.5), half_h2 = box2[3] * T(0.5);
  const T a = rounded_product(half_w2, ux), b = rounded_product(half_w2, uy);
  const T c = rounded_product(half_h2, uy), d = rounded_product(half_h2, ux);
  const T xs[4] = {cx + (a - c), cx + (a + c), cx - (a - c), cx - (a + c)};
  const T ys[4] = {cy + (b + d), cy + (b - d), cy - (b + d), cy - (b - d)};
  const T half_w1 = magnitude(box1[2]) * T(0.5), half_h1 = magnitude(box1[3]) * T(0.5);
  T terms[4];
  for (int k = 0; k < 4; ++k) {
    terms[k] = band_integral<T>(xs[k], ys[k], xs[(k + 1) & 3], ys[(k + 1) & 3], half_w1, half_h1);
  }
  T inter = magnitude(((terms[0] + terms[1]) + terms[2]) + terms[3]);
  const T smaller = area1 < area2 ? area1 : area2;
  inter = inter < smaller ? inter : smaller;
  return clamp_to(inter / (area1 + area2 - inter), T(0), T(1));
}

}  // namespace rotated_iou_detail

// detectron2's value farther than this from the exact IoU is unsound (replaced by the exact one).
constexpr float kSoundTolerance = 1e-4f;

// box = (x_center, y_center, width, height, angle_degrees); returns the IoU in [0, 1] (see the top
// of this file). box1 is detectron2's first argument (the kept box in its NMS).
template <typename T>
DETLAYERS_HOST_DEVICE inline T rotated_box_iou(const T* box1, const T* box2) {
  using namespace rotated_iou_detail;
  const T area1 = rounded_product(box1[2], box1[3]);
  const T area2 = rounded_product(box2[2], box2[3]);
  if (area1 < 1e-14 || area2 < 1e-14) {
    return T(0);
  }
  T cos1, sin1, cos2, sin2;
  cos_sin_degrees(box1[4], true, &cos1, &sin1);
  cos_sin_degrees(box2[4], true, &cos2, &sin2);
  // detectron2's value: corners relative to the midpoint of the two centres.
  const T mid_x = (box1[0] + box2[0]) * T(0.5);
  const T mid_y = (box1[1] + box2[1]) * T(0.5);
  Vec2<T> corners1[4];
  Vec2<T> corners2[4];
  box_corners<T>(box1[0] - mid_x, box1[1] - mid_y, box1[2], box1[3], cos1, sin1, corners1);
  box_corners<T>(box2[0] - mid_x, box2[1] - mid_y, box2[2], box2[3], cos2, sin2, corners2);
  Vec2<T> candidates[kMaxCandidates];
  const int count = intersection_candidates<T>(corners1, corners2, candidates);
  const T inter = count <= 2 ? T(0) : convex_hull_area<T>(candidates, count);
  const T reference = inter / (area1 + area2 - inter);

  cos_sin_degrees(box1[4], false, &cos1, &sin1);
  cos_sin_degrees(box2[4], false, &cos2, &sin2);
  const T exact = exact_iou<T>(box1, cos1, sin1, area1, box2, cos2, sin2, area2);
  const bool sound = magnitude(reference - exact) <= static_cast<T>(kSoundTolerance);
  return sound ? clamp_to(reference, T(0), T(1)) : exact;
}

// Reach of a float rotated box: two boxes whose centres are farther apart than the sum of their
// reaches have IoU exactly 0 (no candidate vertex even with detectron2's 1e-5 tolerances), so
// callers may skip the polygon computation. The one C++ definition of the rule; the one Python
// definition is detlayers.rotated_boxes.rotated_reach, with the same float operations.
DETLAYERS_HOST_DEVICE inline float rotated_reach(const float* box) {
  using rotated_iou_detail::rounded_product;
  const float w = fabsf(box[2]), h = fabsf(box[3]);
  if (!(w > 0.0f && h > 0.0f)) return INFINITY;  // also NaN
  const float min_side = w < h ? w : h;
  const float radius = 0.5f * sqrtf(rounded_product(w, w) + rounded_product(h, h));
  const float coord = fabsf(box[0]) + fabsf(box[1]);
  const float reach = rounded_product(radius, 1.002f) + 2e-4f / min_side +
                      rounded_product(2e-5f, coord) + 1e-5f;
  return isfinite(reach) ? reach : INFINITY;
}

// True when the boxes (with reaches from rotated_reach) cannot overlap; false for inf or NaN.
DETLAYERS_HOST_DEVICE inline bool rotated_discs_apart(const float* a, float reach_a, const float* b,
                                                      float reach_b) {
  using rotated_iou_detail::rounded_product;
  const float dx = a[0] - b[0], dy = a[1] - b[1];
  const float reach = reach_a + reach_b;
  return rounded_product(dx, dx) + rounded_product(dy, dy) > rounded_product(reach, reach);
}

}  // namespace detlayers
