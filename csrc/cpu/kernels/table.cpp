// This level's kernel table (see dispatch.hpp), compiled once per level like the kernels.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {

extern const TopkKernel topk_kernel;
extern const NormalizeKernel normalize_kernel;
extern const Dot64Kernel dot64_kernel;
extern const SweepKernel sweep_kernel;

extern const KernelTable kernel_table = {Isa::NUDGEFAST_LEVEL, &topk_kernel, &normalize_kernel, &dot64_kernel,
                                         &sweep_kernel};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
