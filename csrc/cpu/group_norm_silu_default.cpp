// group_norm_silu's CPU kernels for any CPU: at::vec's DEFAULT capability (plain C++ the compiler vectorises
// with the baseline instruction set). group_norm_silu.cpp uses them when at::get_cpu_capability() has no
// AVX2 (or ATEN_CPU_CAPABILITY=default asks for them).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "group_norm_silu_kernels.h"

namespace fastddpm::cpu::group_norm_silu_kernels {

template struct Kernels<Capability::kDefault, float>;
template struct Kernels<Capability::kDefault, double>;
template struct Kernels<Capability::kDefault, c10::BFloat16>;
template struct Kernels<Capability::kDefault, c10::Half>;

}  // namespace fastddpm::cpu::group_norm_silu_kernels
