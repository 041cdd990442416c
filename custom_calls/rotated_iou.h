// Exact IoU of two rotated rectangles, usable from host C++ and from CUDA device code.
//
// A box is (x_center, y_center, width, height, angle_degrees); a positive angle turns the box
// counter-clockwise as seen on screen (image y axis points down). The numbers follow
// detectron2's `pairwise_iou_rotated` step for step, because NMS results must agree with it:
//
//   1. both boxes are moved so the midpoint of their centres is the origin (the shift is formed in
//      double), which keeps the corner coordinates small for boxes far from the image origin;
//   2. IoU is 0 when either area (w * h, in T) is below 1e-14;
//   3. the intersection polygon is the convex hull of the candidate vertices: edge/edge crossings
//      (edge parameters accepted within 1e-5 outside [0, 1]) and corners of one box lying inside
//      the other (projection test with an absolute slack of 1e-5), in that order;
//   4. the hull is built by a Graham scan around the lowest (then leftmost) candidate with an
//      exchange sort on the cross product (1e-6 collinearity slack, ties by distance), and its
//      area is the fan sum of |triangle| areas.
// The tolerances are deliberately loose so that two nearly identical boxes give IoU ~= 1 instead of
// missing a vertex; duplicated candidates are harmless.
//
// Constraints: header only, no STL, no exceptions, no dynamic memory, fixed-size local arrays.
// T = float is the production type (all tolerances compare in double, like the reference);
// T = double is supported for tests.
//
// Rounding: float results are bit-identical to detectron2's CPU op (tests/test_rotated_iou.py)
// when host code is built without FMA contraction (-ffp-contract=off; GCC contracts by default
// once the target has FMA, e.g. -march=native or aarch64); device code prevents contraction itself
// (rounded_product). The IoU is not symmetric bit for bit: detectron2's NMS passes the kept box
// first. detlayers/rotated_boxes.py computes the same numbers in JAX.
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
DETLAYERS_HOST_DEVICE inline float rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DETLAYERS_HOST_DEVICE inline double rounded_product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

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

// Corners in the order (+w/2,+h/2), (+w/2,-h/2), (-w/2,-h/2), (-w/2,+h/2) of the box frame, whose
// width axis is (cos a, -sin a) and height axis (sin a, cos a) in image coordinates.
template <typename T>
DETLAYERS_HOST_DEVICE inline void box_corners(T cx, T cy, T w, T h, T angle_degrees,
                                              Vec2<T> (&corners)[4]) {
  // detectron2's truncated pi / 180 (0.01745329251) is kept on purpose: near 90 and 180 degrees it
  // decides the tiny sin/cos residues, hence which edges count as parallel.
  const double radians = static_cast<double>(angle_degrees) * 0.01745329251;
  const T half_cos = static_cast<T>(cos(radians)) * T(0.5);
  const T half_sin = static_cast<T>(sin(radians)) * T(0.5);
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

}  // namespace rotated_iou_detail

// Intersection area of two rotated boxes given already centred near the origin (see
// rotated_box_iou for the shift).
template <typename T>
DETLAYERS_HOST_DEVICE inline T rotated_box_intersection_area(T cx1, T cy1, T w1, T h1, T a1,
                                                             T cx2, T cy2, T w2, T h2, T a2) {
  using namespace rotated_iou_detail;
  Vec2<T> corners1[4];
  Vec2<T> corners2[4];
  box_corners<T>(cx1, cy1, w1, h1, a1, corners1);
  box_corners<T>(cx2, cy2, w2, h2, a2, corners2);
  Vec2<T> candidates[kMaxCandidates];
  const int count = intersection_candidates<T>(corners1, corners2, candidates);
  if (count <= 2) {
    return T(0);
  }
  return convex_hull_area<T>(candidates, count);
}

// box = (x_center, y_center, width, height, angle_degrees); returns IoU in [0, 1] (up to rounding).
template <typename T>
DETLAYERS_HOST_DEVICE inline T rotated_box_iou(const T* box1, const T* box2) {
  // Work relative to the midpoint of the two centres; the sum is rounded in T, the halving and
  // the differences are formed in double before rounding back, as in the reference.
  const double mid_x = static_cast<double>(box1[0] + box2[0]) / 2.0;
  const double mid_y = static_cast<double>(box1[1] + box2[1]) / 2.0;
  const T cx1 = static_cast<T>(static_cast<double>(box1[0]) - mid_x);
  const T cy1 = static_cast<T>(static_cast<double>(box1[1]) - mid_y);
  const T cx2 = static_cast<T>(static_cast<double>(box2[0]) - mid_x);
  const T cy2 = static_cast<T>(static_cast<double>(box2[1]) - mid_y);
  const T area1 = rotated_iou_detail::rounded_product(box1[2], box1[3]);
  const T area2 = rotated_iou_detail::rounded_product(box2[2], box2[3]);
  if (area1 < 1e-14 || area2 < 1e-14) {
    return T(0);
  }
  const T inter = rotated_box_intersection_area<T>(cx1, cy1, box1[2], box1[3], box1[4], cx2, cy2,
                                                   box2[2], box2[3], box2[4]);
  return inter / (area1 + area2 - inter);
}

}  // namespace detlayers
