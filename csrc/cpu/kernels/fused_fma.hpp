// fused(a, b, c) = fmaf(a, b, c), one rounding: the baseline levels' scalar twin of the vector
// FMAs, shared by topk.cpp and correct_rows.cpp. Included inside each kernel file's anonymous
// namespace (so each level's translation unit keeps its own copy, compiled with its own flags).
#pragma once
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(__FMA__)
// Without an FMA instruction (std::fma would be a library call per element): a * b is exact in
// double, so a + b * c rounded to double, then to float, rounds only once unless the double lies
// exactly halfway between two floats (or among float subnormals); then std::fma. A zero double is
// an exact zero (a nonzero a * b + c is far above double's smallest number).
inline float fused(float a, float b, float c) {
    const double s = static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c);
    uint64_t bits;
    std::memcpy(&bits, &s, sizeof bits);
    const bool midpoint = (bits & 0x1fffffffu) == 0x10000000u;
    const bool subnormal = ((bits >> 52) & 0x7ffu) < 1023u - 126u && (bits << 1) != 0;
    if (midpoint || subnormal) return std::fma(a, b, c);
    return static_cast<float>(s);
}
#else
inline float fused(float a, float b, float c) { return std::fma(a, b, c); }
#endif
