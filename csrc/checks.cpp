// Argument checks shared by the entry points of mmkernels._C.
#include "ops.h"

namespace mmk {

void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", name,
                   " must be float32/float16/bfloat16/float64, got ", dt);
}

void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got a tensor of shape ", t.sizes(),
              " with strides ", t.strides(), " (call .contiguous())");
}

void check_same_device(const at::Tensor& t, const at::Device& dev, const char* op, const char* name, const char* ref) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, " (the device of ", ref, "), got ", t.device());
}

bool with_cuda() {
#ifdef MMKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace mmk
