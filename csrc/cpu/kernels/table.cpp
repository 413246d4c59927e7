// This level's kernel table (see dispatch.hpp), compiled once per level like the kernels.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {

extern const TopkKernel topk_kernel;
extern const NormalizeKernel normalize_kernel;
extern const Dot64Kernel dot64_kernel;
extern const SweepKernel sweep_kernel;
extern const QTopkKernel qtopk_int8_kernel;
extern const QTopkKernel qtopk_hamming_kernel;
extern const CorrectKernel correct_kernel;
#if defined(NUDGEFAST_AVX512_SUBPATHS)
extern const QTopkKernel qtopk_int8_vnni_kernel;
extern const QTopkKernel qtopk_hamming_vpopcnt_kernel;
#define NUDGEFAST_SUBPATH(name) &name
#else
#define NUDGEFAST_SUBPATH(name) nullptr  // this level has no such path
#endif

extern const KernelTable kernel_table = {Isa::NUDGEFAST_LEVEL, &topk_kernel, &normalize_kernel, &dot64_kernel,
                                         &sweep_kernel,
                                         &qtopk_int8_kernel, &qtopk_hamming_kernel, NUDGEFAST_SUBPATH(qtopk_int8_vnni_kernel),
                                         NUDGEFAST_SUBPATH(qtopk_hamming_vpopcnt_kernel), &correct_kernel};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
