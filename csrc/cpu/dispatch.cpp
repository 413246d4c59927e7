// Runtime instruction-set dispatch (see dispatch.hpp): cpuid + XCR0 for the CPU and the OS,
// arch_prctl for AMX on Linux, NUDGEFAST_CPU_ISA to force a lower level.
#include "dispatch.hpp"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define NUDGEFAST_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif
#if defined(NUDGEFAST_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace nudgefast {

// One table per level compiled into this build: csrc/cpu/kernels/*.cpp, once per level; the
// build defines NUDGEFAST_HAVE_<LEVEL> for each level it compiled besides the baseline.
namespace baseline { extern const KernelTable kernel_table; }
#ifdef NUDGEFAST_HAVE_AVX2
namespace avx2 { extern const KernelTable kernel_table; }
#endif
#ifdef NUDGEFAST_HAVE_AVX512
namespace avx512 { extern const KernelTable kernel_table; }
#endif

namespace {

const KernelTable* compiled_table(Isa level) {
    switch (level) {
        case Isa::baseline: return &baseline::kernel_table;
#ifdef NUDGEFAST_HAVE_AVX2
        case Isa::avx2: return &avx2::kernel_table;
#endif
#ifdef NUDGEFAST_HAVE_AVX512
        case Isa::avx512:
        case Isa::amx: return &avx512::kernel_table;  // no AMX kernel yet
#endif
        default: return nullptr;
    }
}

#ifdef NUDGEFAST_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
    int v[4];
    __cpuidex(v, static_cast<int>(leaf), static_cast<int>(sub));
    for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned>(v[i]);
#else
    if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

// XCR0: which register states the OS saves on a context switch (only if OSXSAVE is set).
uint64_t xcr0() {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}

// Linux hands out the AMX tile data state (8 KiB per thread) only on request
// (ARCH_REQ_XCOMP_PERM), and the grant is process-wide (it changes, e.g., the minimum signal
// stack size). No kernel uses AMX yet, so detection only asks whether the kernel would grant it
// (ARCH_GET_XCOMP_SUPP); the AMX kernels will request the permission before their first use.
bool os_offers_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr int kArchGetXcompSupp = 0x1021;
    constexpr int kXfeatureXtiledata = 18;
    unsigned long long supported = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompSupp, &supported) != 0) return false;
    return (supported >> kXfeatureXtiledata) & 1ULL;
#else
    return false;  // other systems: AMX is not used (no kernel either)
#endif
}
#endif

CpuFeatures detect() {
    CpuFeatures f;
#ifdef NUDGEFAST_X86
    unsigned r[4];
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    cpuid(1, 0, r);
    const unsigned ecx1 = r[2];
    f.fma = (ecx1 >> 12) & 1;
    f.f16c = (ecx1 >> 29) & 1;
    const bool osxsave = (ecx1 >> 27) & 1, avx = (ecx1 >> 28) & 1;
    const uint64_t xcr = osxsave ? xcr0() : 0;
    f.os_avx = avx && (xcr & 0x6) == 0x6;             // SSE + AVX state
    f.os_avx512 = f.os_avx && (xcr & 0xe0) == 0xe0;   // opmask, ZMM_Hi256, Hi16_ZMM
    f.os_amx = (xcr & 0x60000) == 0x60000;            // XTILECFG, XTILEDATA
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        const unsigned ebx = r[1], ecx = r[2], edx = r[3], max_sub = r[0];
        f.avx2 = (ebx >> 5) & 1;
        f.avx512f = (ebx >> 16) & 1;
        f.avx512dq = (ebx >> 17) & 1;
        f.avx512bw = (ebx >> 30) & 1;
        f.avx512vl = (ebx >> 31) & 1;
        f.avx512_vnni = (ecx >> 11) & 1;
        f.avx512_vpopcntdq = (ecx >> 14) & 1;
        f.amx_bf16 = (edx >> 22) & 1;
        f.amx_tile = (edx >> 24) & 1;
        f.amx_int8 = (edx >> 25) & 1;
        if (max_sub >= 1) {
            cpuid(7, 1, r);
            f.avx512_bf16 = (r[0] >> 5) & 1;
        }
    }
    if (f.amx_tile && f.os_amx) f.amx_permitted = os_offers_amx();
#endif
    return f;
}

bool cpu_runs(const CpuFeatures& f, Isa level) {
    const bool avx2 = f.os_avx && f.avx2 && f.fma && f.f16c;
    const bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl;
    switch (level) {
        case Isa::baseline: return true;
        case Isa::avx2: return avx2;
        case Isa::avx512: return avx512;
        case Isa::amx: return avx512 && f.amx_tile && (f.amx_bf16 || f.amx_int8) && f.amx_permitted;
    }
    return false;
}

std::atomic<int> g_active{-1};  // -1: not chosen yet (the first use picks the best)

std::string allowed_values() {
    std::string s;
    for (int i = 0; i < kIsaLevels; ++i) s += std::string(i ? ", " : "") + isa_name(static_cast<Isa>(i));
    return s;
}

std::string supported_list() {
    std::string s;
    for (Isa level : supported_isas()) s += std::string(s.empty() ? "" : ", ") + isa_name(level);
    return s;
}

Isa parse_level(const std::string& name, const char* what) {
    for (int i = 0; i < kIsaLevels; ++i)
        if (name == isa_name(static_cast<Isa>(i))) {
            const Isa level = static_cast<Isa>(i);
            if (!cpu_runs(cpu_features(), level) || !compiled_table(level))
                throw std::invalid_argument(std::string(what) + "=" + name + " is not supported here: this CPU and " +
                                            "build support " + supported_list() +
                                            "; pick one of those (or unset it for the best)");
            return level;
        }
    throw std::invalid_argument(std::string(what) + "=" + name + " is not a known instruction-set level; the " +
                                "allowed values are " + allowed_values() + " (or unset it for the best this CPU has)");
}

}  // namespace

const char* isa_name(Isa level) {
    switch (level) {
        case Isa::baseline: return "baseline";
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
        case Isa::amx: return "amx";
    }
    return "?";
}

const CpuFeatures& cpu_features() {
    static const CpuFeatures features = detect();
    return features;
}

std::vector<Isa> supported_isas() {
    std::vector<Isa> out;
    for (int i = 0; i < kIsaLevels; ++i) {
        const Isa level = static_cast<Isa>(i);
        if (cpu_runs(cpu_features(), level) && compiled_table(level)) out.push_back(level);
    }
    return out;
}

Isa best_isa() { return supported_isas().back(); }

Isa active_isa() {
    int v = g_active.load(std::memory_order_acquire);
    if (v < 0) {
        v = static_cast<int>(best_isa());
        int expected = -1;
        if (!g_active.compare_exchange_strong(expected, v)) v = expected;
    }
    return static_cast<Isa>(v);
}

Isa kernel_isa() { return compiled_table(active_isa())->level; }

const KernelTable& kernels() { return *compiled_table(active_isa()); }

namespace {
std::atomic<bool> g_subpaths{true};
}

void set_qtopk_subpaths(bool allowed) { g_subpaths.store(allowed, std::memory_order_release); }

const QTopkKernel& qtopk_int8_kernel() {
    const KernelTable& t = kernels();
    const bool sub = g_subpaths.load(std::memory_order_acquire);
    return sub && t.qtopk_int8_vnni && cpu_features().avx512_vnni ? *t.qtopk_int8_vnni : *t.qtopk_int8;
}

const QTopkKernel& qtopk_hamming_kernel() {
    const KernelTable& t = kernels();
    const bool sub = g_subpaths.load(std::memory_order_acquire);
    return sub && t.qtopk_hamming_vpopcnt && cpu_features().avx512_vpopcntdq ? *t.qtopk_hamming_vpopcnt
                                                                              : *t.qtopk_hamming;
}

void init_isa() {
    const char* env = std::getenv(kIsaEnv);
    const Isa level = (env && *env) ? parse_level(env, kIsaEnv) : best_isa();
    g_active.store(static_cast<int>(level), std::memory_order_release);
}

void set_isa(const std::string& name) {
    g_active.store(static_cast<int>(parse_level(name, "level")), std::memory_order_release);
}

}  // namespace nudgefast
