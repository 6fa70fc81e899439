// The knowledge-distillation loss and its gradient (cuda/distillation.py is the reference and states the
// formulas). Student and teacher logits [rows, vocab] in bf16 or float32; everything else float32.
#include "common.cuh"

// One block per row. Pass 1: the maxima of s / T and t / T (block reductions). Pass 2, in one sweep: the
// two sums of exp(x / T - max), and the teacher-weighted sum of (t - s) / T, which divided by the
// teacher's sum is sum_v p_v (t_v - s_v) / T. Then KL = that - lse(t / T) + lse(s / T). The softened
// distributions are never stored: the backward rebuilds them from the logits and the two logsumexps.
template <typename T>
__global__ void distillation_forward(const T* __restrict__ student, const T* __restrict__ teacher,
                                     float inverse_temperature, float* __restrict__ row_kl,
                                     float* __restrict__ student_lse, float* __restrict__ teacher_lse, int vocab) {
  const long long row = blockIdx.x;
  const T* s = student + row * vocab;
  const T* t = teacher + row * vocab;
  float student_max = -infinity(), teacher_max = -infinity();
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    student_max = fmaxf(student_max, to_float(s[v]) * inverse_temperature);
    teacher_max = fmaxf(teacher_max, to_float(t[v]) * inverse_temperature);
  }
  student_max = block_reduce<true>(student_max);
  teacher_max = block_reduce<true>(teacher_max);
  float student_sum = 0.0f, teacher_sum = 0.0f, weighted_gap = 0.0f;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float scaled_s = to_float(s[v]) * inverse_temperature, scaled_t = to_float(t[v]) * inverse_temperature;
    const float teacher_weight = __expf(scaled_t - teacher_max);
    student_sum += __expf(scaled_s - student_max);
    teacher_sum += teacher_weight;
    weighted_gap += teacher_weight * (scaled_t - scaled_s);
  }
  student_sum = block_reduce<false>(student_sum);
  teacher_sum = block_reduce<false>(teacher_sum);
  weighted_gap = block_reduce<false>(weighted_gap);
  if (threadIdx.x == 0) {
    const float student_logsumexp = student_max + __logf(student_sum);
    const float teacher_logsumexp = teacher_max + __logf(teacher_sum);
    student_lse[row] = student_logsumexp;
    teacher_lse[row] = teacher_logsumexp;
    row_kl[row] = weighted_gap / teacher_sum - teacher_logsumexp + student_logsumexp;
  }
}

// d loss / d s[v] = (q[v] - p[v]) * scale, q[v] = exp(s[v] / T - lse_s), p[v] = exp(t[v] / T - lse_t);
// scale = d loss * T / rows (a device scalar: no host sync).
template <typename T>
__global__ void distillation_backward(const T* __restrict__ student, const T* __restrict__ teacher,
                                      const float* __restrict__ student_lse, const float* __restrict__ teacher_lse,
                                      float inverse_temperature, const float* __restrict__ scale,
                                      T* __restrict__ grad_student, int vocab) {
  const long long row = blockIdx.x;
  const float factor = scale[0], lse_s = student_lse[row], lse_t = teacher_lse[row];
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const long long at = row * vocab + v;
    const float q = __expf(to_float(student[at]) * inverse_temperature - lse_s);
    const float p = __expf(to_float(teacher[at]) * inverse_temperature - lse_t);
    grad_student[at] = from_float<T>((q - p) * factor);
  }
}
