// The pybind11 module nudgefast._cpu: one function per op, thin.
//
// The bindings check dtypes, contiguity and shapes and never convert: a silent copy of a corpus
// chunk (possibly a read-only memmap of 10^8 rows) is exactly what must not happen, so wrong
// input is a TypeError and the Python wrapper (nudgefast/_backends/cpp_backend.py) decides what
// to convert. Output arrays are allocated with the GIL held; all native work runs without it.
//
// The kernels trust their index arguments (one unchecked value is a silent read or write outside
// a buffer), so every index array is checked here, whole, before any output is touched: O(n)
// scans, negligible next to the ops. A bad index is a ValueError naming the argument, the first
// offending entry and the fix.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"

namespace py = pybind11;
using namespace nudgefast;

namespace {

template <typename T>
constexpr char kind_of() {
    return std::is_same<T, bool>::value ? 'b' : (std::is_floating_point<T>::value ? 'f' : 'i');
}

bool has_dtype(const py::array& a, char kind, std::size_t itemsize) {
    const py::dtype dt = a.dtype();
    return dt.kind() == kind && dt.itemsize() == static_cast<py::ssize_t>(itemsize) && dt.byteorder() != '>';
}

template <typename T>
bool has_dtype(const py::array& a) {
    return has_dtype(a, kind_of<T>(), sizeof(T));
}

[[noreturn]] void fail_type(const char* name, const std::string& want, const py::array& a) {
    throw py::type_error(std::string("nudgefast._cpu: ") + name + " must be a C-contiguous " + want +
                         " array, got dtype " + std::string(py::str(a.dtype())) + " ndim " + std::to_string(a.ndim()) +
                         (a.flags() & py::array::c_style ? "" : " (not C-contiguous)"));
}

void check_ndim(const py::array& a, const char* name, py::ssize_t ndim) {
    if (a.ndim() != ndim)
        throw py::value_error(std::string("nudgefast._cpu: ") + name + " must have " + std::to_string(ndim) +
                              " dimensions, got " + std::to_string(a.ndim()));
}

// Read-only view of a C-contiguous array of exactly dtype T.
template <typename T>
const T* in(const py::array& a, const char* name, py::ssize_t ndim) {
    check_ndim(a, name, ndim);
    if (!has_dtype<T>(a) || !(a.flags() & py::array::c_style)) fail_type(name, py::str(py::dtype::of<T>()), a);
    return static_cast<const T*>(a.data());
}

// Writable view (updated in place).
template <typename T>
T* inout(py::array& a, const char* name, py::ssize_t ndim) {
    in<T>(a, name, ndim);
    if (!a.writeable()) throw py::value_error(std::string("nudgefast._cpu: ") + name + " must be writeable");
    return static_cast<T*>(a.mutable_data());
}

void check_dim(const py::array& a, const char* name, py::ssize_t axis, py::ssize_t want) {
    if (a.shape(axis) != want)
        throw py::value_error(std::string("nudgefast._cpu: ") + name + ".shape[" + std::to_string(axis) + "] is " +
                              std::to_string(a.shape(axis)) + ", expected " + std::to_string(want) +
                              " (the shapes of one call's arrays must agree; see the op contract)");
}

// The result array: a fresh one, or the caller's `out` (checked: dtype, layout, shape). Tests pass
// NaN-poisoned `out` buffers to prove that every element is written.
template <typename T>
py::array_t<T> output(const py::object& out, const char* name, std::vector<py::ssize_t> shape) {
    if (out.is_none()) return py::array_t<T>(shape);
    if (!py::isinstance<py::array>(out))
        throw py::type_error(std::string("nudgefast._cpu: ") + name + " must be an array");
    py::array a = py::reinterpret_borrow<py::array>(out);
    inout<T>(a, name, static_cast<py::ssize_t>(shape.size()));
    for (std::size_t i = 0; i < shape.size(); ++i) check_dim(a, name, static_cast<py::ssize_t>(i), shape[i]);
    return py::reinterpret_borrow<py::array_t<T>>(a);
}

// ---------------------------------------------------------------------------------------------
// Scalar arguments. Taken as Python objects, so that a bad value is one line naming it rather than
// pybind11's "incompatible function arguments" with every array of the call printed.

[[noreturn]] void fail_value(const std::string& msg) { throw py::value_error("nudgefast._cpu: " + msg); }

std::string repr_of(const py::handle& v) { return std::string(py::repr(v)); }

// An int (anything with __index__ but bool); false when it does not fit in int64.
bool to_int64(const py::object& v, const char* name, int64_t& n) {
    if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
        throw py::type_error(std::string("nudgefast._cpu: ") + name + " must be an int, got " + repr_of(v) + " (" +
                             std::string(Py_TYPE(v.ptr())->tp_name) + ")");
    const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    n = static_cast<int64_t>(value);
    return overflow == 0;
}

int64_t int_arg(const py::object& v, const char* name) {
    int64_t n = 0;
    if (!to_int64(v, name, n)) fail_value(std::string(name) + " = " + repr_of(v) + " does not fit in int64");
    return n;
}

// n_threads: None for all cores, else an int in [1, kMaxThreads].
int threads_arg(const py::object& v) {
    if (v.is_none()) return resolve_threads(0);
    int64_t n = 0;
    if (!to_int64(v, "n_threads", n) || n < 1 || n > kMaxThreads)
        fail_value("n_threads must be None (all cores) or an int in [1, " + std::to_string(kMaxThreads) + "], got " +
                   repr_of(v));
    return resolve_threads(n);
}

// ---------------------------------------------------------------------------------------------
// Index arrays (int64, already checked for dtype and layout).

// name[i], or name[i / cols, i % cols] for a 2-D array of `cols` columns.
std::string at(const char* name, int64_t i, int64_t cols = 0) {
    if (cols > 0) return std::string(name) + "[" + std::to_string(i / cols) + ", " + std::to_string(i % cols) + "]";
    return std::string(name) + "[" + std::to_string(i) + "]";
}

// Every entry in [lo, hi); `what` names the range for the message, `fix` says what to pass.
void check_range(const int64_t* v, int64_t n, int64_t lo, int64_t hi, const char* name, const std::string& what,
                 const std::string& fix = "", int64_t cols = 0) {
    for (int64_t i = 0; i < n; ++i)
        if (v[i] < lo || v[i] >= hi)
            fail_value(at(name, i, cols) + " = " + std::to_string(v[i]) + " is outside [" + std::to_string(lo) +
                       (hi == std::numeric_limits<int64_t>::max() ? ", inf" : ", " + std::to_string(hi)) + ") (" +
                       what + ")" + (fix.empty() ? "" : "; " + fix));
}

// Sorted strictly ascending (sorted, no duplicates).
void check_ascending(const int64_t* v, int64_t n, const char* name, const std::string& fix) {
    for (int64_t i = 1; i < n; ++i)
        if (v[i] <= v[i - 1])
            fail_value(std::string(name) + " must be sorted strictly ascending, but " + at(name, i) + " = " +
                       std::to_string(v[i]) + " follows " + at(name, i - 1) + " = " + std::to_string(v[i - 1]) +
                       "; " + fix);
}

// A CSR pointer array: ptr[0] == 0, non-decreasing, ptr[n - 1] == total (the length of the array
// it splits, named `of`). n >= 1.
void check_ptr(const int64_t* ptr, int64_t n, int64_t total, const char* name, const char* of) {
    if (ptr[0] != 0) fail_value(at(name, 0) + " = " + std::to_string(ptr[0]) + ", must be 0 (" + name +
                                " holds segment starts into " + of + ")");
    for (int64_t i = 1; i < n; ++i)
        if (ptr[i] < ptr[i - 1])
            fail_value(std::string(name) + " must be non-decreasing, but " + at(name, i) + " = " +
                       std::to_string(ptr[i]) + " < " + at(name, i - 1) + " = " + std::to_string(ptr[i - 1]));
    if (ptr[n - 1] != total)
        fail_value(at(name, n - 1) + " = " + std::to_string(ptr[n - 1]) + ", must equal len(" + of + ") = " +
                   std::to_string(total));
}

// Answer lists: ans_ptr splits ans_index into one list per query (n_lists + 1 entries), every
// list sorted strictly ascending with entries >= 0 (the kernels binary-search them). Returns the
// longest list's length.
int64_t check_answers(const int64_t* ptr, int64_t n_lists, const int64_t* index, int64_t n_index) {
    check_ptr(ptr, n_lists + 1, n_index, "ans_ptr", "ans_index");
    check_range(index, n_index, 0, std::numeric_limits<int64_t>::max(), "ans_index", "record rows");
    int64_t longest = 0;
    for (int64_t i = 0; i < n_lists; ++i) {
        longest = std::max(longest, ptr[i + 1] - ptr[i]);
        for (int64_t p = ptr[i] + 1; p < ptr[i + 1]; ++p)
            if (index[p] <= index[p - 1])
                fail_value("the answers of query " + std::to_string(i) + " (ans_index[ans_ptr[" + std::to_string(i) +
                           "]:ans_ptr[" + std::to_string(i + 1) + "]]) must be sorted strictly ascending, but " +
                           at("ans_index", p) + " = " + std::to_string(index[p]) + " follows " +
                           std::to_string(index[p - 1]) + "; pass np.unique of each query's answers");
    }
    return longest;
}

// ---------------------------------------------------------------------------------------------

py::array_t<double> py_query_gradient(const py::array& queries, const py::array& order, const py::array& seg_ptr,
                                      const py::object& n_threads, const py::object& out_arg) {
    check_ndim(queries, "queries", 2);
    const int64_t n_queries = queries.shape(0), d = queries.shape(1);
    const int64_t* ord = in<int64_t>(order, "order", 1);
    const int64_t* ptr = in<int64_t>(seg_ptr, "seg_ptr", 1);
    if (seg_ptr.shape(0) < 1) fail_value("seg_ptr must have t + 1 >= 1 entries (it is [0] when t = 0), got none");
    const int64_t t = seg_ptr.shape(0) - 1;
    check_ptr(ptr, t + 1, order.shape(0), "seg_ptr", "order");
    check_range(ord, order.shape(0), 0, n_queries, "order", "the rows of queries");
    const int threads = threads_arg(n_threads);
    py::array_t<double> out = output<double>(out_arg, "out", {t, d});
    double* o = out.mutable_data();
    if (has_dtype<double>(queries)) {
        const double* q = in<double>(queries, "queries", 2);
        py::gil_scoped_release nogil;
        query_gradient(q, d, ord, ptr, t, o, threads);
    } else {
        const float* q = in<float>(queries, "queries", 2);
        py::gil_scoped_release nogil;
        query_gradient(q, d, ord, ptr, t, o, threads);
    }
    return out;
}

// A top-k state: best_scores (n_q, k) float32 and best_index (n_q, k) int64, both written in place.
struct StateArg {
    float* scores;
    int64_t* index;
    int64_t k;
};

StateArg state_arg(py::array& best_scores, py::array& best_index, int64_t n_q) {
    float* bs = inout<float>(best_scores, "best_scores", 2);
    int64_t* bi = inout<int64_t>(best_index, "best_index", 2);
    check_dim(best_scores, "best_scores", 0, n_q);
    check_dim(best_index, "best_index", 0, n_q);
    check_dim(best_index, "best_index", 1, best_scores.shape(1));
    return {bs, bi, static_cast<int64_t>(best_scores.shape(1))};
}

int64_t py_topk_update(const py::array& queries, const py::array& chunk, const py::object& row_offset_arg,
                       const py::array& exclude, bool normalize, py::array& best_scores, py::array& best_index,
                       const py::object& n_threads) {
    const float* q = in<float>(queries, "queries", 2);
    const int64_t n_q = queries.shape(0), d = queries.shape(1);
    const auto [bs, bi, k] = state_arg(best_scores, best_index, n_q);
    const int64_t* ex = in<int64_t>(exclude, "exclude", 1);

    // The chunk: float16/32/64 rows, each row contiguous; rows may be strided (a column slice of a
    // wider array) and read-only (np.memmap). Never copied.
    check_ndim(chunk, "chunk", 2);
    check_dim(chunk, "chunk", 1, d);
    ChunkType type;
    if (has_dtype<float>(chunk)) type = ChunkType::f32;
    else if (has_dtype<double>(chunk)) type = ChunkType::f64;
    else if (has_dtype(chunk, 'f', 2)) type = ChunkType::f16;
    else fail_type("chunk", "float16, float32 or float64", chunk);
    const int64_t m = chunk.shape(0);
    const int64_t item = chunk.itemsize();
    const int64_t stride0 = chunk.strides(0), stride1 = chunk.strides(1);
    if (m > 0 && ((d > 1 && stride1 != item) || (m > 1 && (stride0 <= 0 || stride0 % item != 0))))
        throw py::type_error("nudgefast._cpu: chunk rows must be contiguous with a positive row stride "
                             "(pass np.ascontiguousarray(chunk))");
    const int64_t row_stride = m > 1 ? stride0 / item : d;
    const void* data = chunk.data();
    const int64_t n_ex = exclude.shape(0);
    // The kernel walks exclude in step with the rows and marks exclude[i] - r0 in a tile of r0's
    // rows: an unsorted or out-of-range entry is a write outside that tile.
    check_ascending(ex, n_ex, "exclude", "pass np.unique(exclude)");
    check_range(ex, n_ex, 0, m, "exclude", "the rows of chunk",
                "exclude holds chunk-local rows: subtract row_offset from global record indices");
    const int64_t row_offset = int_arg(row_offset_arg, "row_offset");
    if (row_offset < 0 || row_offset > std::numeric_limits<int64_t>::max() - m)
        fail_value("row_offset must be >= 0 (the global index of chunk row 0) with row_offset + len(chunk) in "
                   "int64, got " + std::to_string(row_offset));
    const int threads = threads_arg(n_threads);

    py::gil_scoped_release nogil;
    return topk_update(q, n_q, d, data, type, m, row_stride, row_offset, ex, n_ex, normalize, bs, bi, k, threads);
}

// A chunk of codes: int8 or uint8 (read as bytes), `cols` columns, each row contiguous, rows a
// positive stride apart (a column slice, a read-only np.memmap: never copied). Returns the row
// stride in bytes.
int64_t code_rows(const py::array& codes, const char* name, int64_t cols) {
    check_ndim(codes, name, 2);
    check_dim(codes, name, 1, cols);
    if (!(has_dtype(codes, 'i', 1) || has_dtype(codes, 'u', 1))) fail_type(name, "int8 or uint8", codes);
    const int64_t m = codes.shape(0);
    const int64_t stride0 = codes.strides(0), stride1 = codes.strides(1);
    if (m > 0 && ((cols > 1 && stride1 != 1) || (m > 1 && stride0 <= 0)))
        throw py::type_error(std::string("nudgefast._cpu: ") + name +
                             " rows must be contiguous with a positive row stride (pass np.ascontiguousarray(" +
                             name + "))");
    return m > 1 ? stride0 : cols;
}

// exclude and row_offset as topk_update checks them.
int64_t check_exclude_offset(const int64_t* ex, int64_t n_ex, int64_t m, const py::object& row_offset_arg,
                             const char* chunk_name) {
    check_ascending(ex, n_ex, "exclude", "pass np.unique(exclude)");
    check_range(ex, n_ex, 0, m, "exclude", std::string("the rows of ") + chunk_name,
                "exclude holds chunk-local rows: subtract row_offset from global record indices");
    const int64_t row_offset = int_arg(row_offset_arg, "row_offset");
    if (row_offset < 0 || row_offset > std::numeric_limits<int64_t>::max() - m)
        fail_value("row_offset must be >= 0 (the global index of chunk row 0) with row_offset + len(" +
                   std::string(chunk_name) + ") in int64, got " + std::to_string(row_offset));
    return row_offset;
}

int64_t py_qtopk_int8(const py::array& qcodes, const py::array& qscale, const py::array& qoffset,
                      const py::array& codes, const py::object& row_offset_arg, const py::array& exclude,
                      bool signed_codes, const py::array& low, const py::array& step, bool normalize,
                      py::array& best_scores, py::array& best_index, const py::object& n_threads) {
    const int8_t* q = in<int8_t>(qcodes, "qcodes", 2);
    const int64_t n_q = qcodes.shape(0), d = qcodes.shape(1);
    const float* qs = in<float>(qscale, "qscale", 1);
    const float* qo = in<float>(qoffset, "qoffset", 1);
    check_dim(qscale, "qscale", 0, n_q);
    check_dim(qoffset, "qoffset", 0, n_q);
    const float* lo = in<float>(low, "low", 1);
    const float* st = in<float>(step, "step", 1);
    if (normalize) {
        check_dim(low, "low", 0, d);
        check_dim(step, "step", 0, d);
    }
    const auto [bs, bi, k] = state_arg(best_scores, best_index, n_q);
    const int64_t* ex = in<int64_t>(exclude, "exclude", 1);
    const int64_t row_stride = code_rows(codes, "codes", d);
    const int64_t m = codes.shape(0);
    // The int32 sums are exact while 127 * 255 * d < 2^31.
    if (d > 66000) fail_value("codes have d = " + std::to_string(d) + " dimensions; qtopk_int8 takes at most 66000 "
                              "(the int32 sums of 127 * 255 per dimension must not overflow)");
    const int64_t row_offset = check_exclude_offset(ex, exclude.shape(0), m, row_offset_arg, "codes");
    const int threads = threads_arg(n_threads);
    const uint8_t* data = static_cast<const uint8_t*>(codes.data());
    py::gil_scoped_release nogil;
    return qtopk_int8(q, qs, qo, n_q, d, data, m, row_stride, row_offset, ex, exclude.shape(0), signed_codes, lo, st,
                      normalize, bs, bi, k, threads);
}

void py_dequantize_rows(const py::array& codes, bool signed_codes, const py::array& low, const py::array& step,
                        py::array& out, const py::object& n_threads) {
    const float* lo = in<float>(low, "low", 1);
    const int64_t d = low.shape(0);
    const float* st = in<float>(step, "step", 1);
    check_dim(step, "step", 0, d);
    const int64_t row_stride = code_rows(codes, "codes", d);
    const int64_t m = codes.shape(0);
    float* o = inout<float>(out, "out", 2);
    check_dim(out, "out", 0, m);
    check_dim(out, "out", 1, d);
    const int threads = threads_arg(n_threads);
    const uint8_t* data = static_cast<const uint8_t*>(codes.data());
    py::gil_scoped_release nogil;
    dequantize_rows(data, m, d, row_stride, signed_codes, lo, st, o, threads);
}

int64_t py_qtopk_hamming(const py::array& qbits, const py::array& codes, const py::object& row_offset_arg,
                         const py::array& exclude, const py::object& n_bits_arg, py::array& best_scores,
                         py::array& best_index, const py::object& n_threads) {
    check_ndim(qbits, "qbits", 2);
    if (!(has_dtype(qbits, 'i', 1) || has_dtype(qbits, 'u', 1)) || !(qbits.flags() & py::array::c_style))
        fail_type("qbits", "int8 or uint8", qbits);
    const int64_t n_q = qbits.shape(0), w = qbits.shape(1);
    const auto [bs, bi, k] = state_arg(best_scores, best_index, n_q);
    const int64_t* ex = in<int64_t>(exclude, "exclude", 1);
    const int64_t row_stride = code_rows(codes, "codes", w);
    const int64_t m = codes.shape(0);
    const int64_t row_offset = check_exclude_offset(ex, exclude.shape(0), m, row_offset_arg, "codes");
    const int64_t n_bits = int_arg(n_bits_arg, "n_bits");
    if (n_bits < 0 || n_bits > (int64_t{1} << 24))
        fail_value("n_bits must be in [0, 2**24] (scores n_bits - 2 * distance are exact in float32), got " +
                   std::to_string(n_bits));
    const int threads = threads_arg(n_threads);
    const uint8_t* q = static_cast<const uint8_t*>(qbits.data());
    const uint8_t* data = static_cast<const uint8_t*>(codes.data());
    py::gil_scoped_release nogil;
    return qtopk_hamming(q, n_q, w, data, m, row_stride, row_offset, ex, exclude.shape(0), n_bits, bs, bi, k,
                         threads);
}

py::tuple py_nudge_m_intervals(const py::array& S, const py::array& G, const py::array& pair_query,
                               const py::array& s_x, const py::array& g_x, const py::array& u_score, double eps,
                               const py::object& n_threads, const py::object& out) {
    const double* s = in<double>(S, "S", 2);
    const double* g = in<double>(G, "G", 2);
    check_dim(G, "G", 0, S.shape(0));
    check_dim(G, "G", 1, S.shape(1));
    const int64_t P = pair_query.shape(0);
    const int64_t* pq = in<int64_t>(pair_query, "pair_query", 1);
    const double* sx = in<double>(s_x, "s_x", 1);
    const double* gx = in<double>(g_x, "g_x", 1);
    const double* us = in<double>(u_score, "u_score", 1);
    check_dim(s_x, "s_x", 0, P);
    check_dim(g_x, "g_x", 0, P);
    check_dim(u_score, "u_score", 0, P);
    check_range(pq, P, 0, S.shape(0), "pair_query", "the rows of S: validation queries");
    const int threads = threads_arg(n_threads);
    const bool given = !out.is_none();
    if (given && (!py::isinstance<py::tuple>(out) || py::len(out) != 3))
        throw py::type_error("nudgefast._cpu: out must be a tuple (low, high, feasible)");
    const py::tuple outs =
        given ? py::reinterpret_borrow<py::tuple>(out) : py::make_tuple(py::none(), py::none(), py::none());
    py::array_t<double> low = output<double>(outs[0], "out[0] (low)", {P});
    py::array_t<double> high = output<double>(outs[1], "out[1] (high)", {P});
    py::array_t<bool> feasible = output<bool>(outs[2], "out[2] (feasible)", {P});
    double* lo = low.mutable_data();
    double* hi = high.mutable_data();
    bool* fe = feasible.mutable_data();
    {
        py::gil_scoped_release nogil;
        nudge_m_intervals(s, g, S.shape(1), pq, sx, gx, us, P, eps, lo, hi, fe, threads);
    }
    return py::make_tuple(low, high, feasible);
}

py::array_t<int64_t> py_nudge_n_sweep(const py::array& S, const py::array& H, const py::array& alpha,
                                      const py::array& beta, const py::array& touched, const py::array& unt_scores,
                                      const py::array& unt_index, const py::array& ans_ptr,
                                      const py::array& ans_index, const py::object& k_val_arg,
                                      const py::object& n_threads, const py::object& out,
                                      const py::object& kth_arg) {
    const double* s = in<double>(S, "S", 2);
    const double* h = in<double>(H, "H", 2);
    const int64_t n_b = S.shape(0), t = S.shape(1);
    check_dim(H, "H", 0, n_b);
    check_dim(H, "H", 1, t);
    const double* a = in<double>(alpha, "alpha", 2);
    const double* b = in<double>(beta, "beta", 2);
    const int64_t n_gamma = alpha.shape(0);
    check_dim(alpha, "alpha", 1, t);
    check_dim(beta, "beta", 0, n_gamma);
    check_dim(beta, "beta", 1, t);
    const int64_t* tch = in<int64_t>(touched, "touched", 1);
    check_dim(touched, "touched", 0, t);
    const double* us = in<double>(unt_scores, "unt_scores", 2);
    const int64_t* ui = in<int64_t>(unt_index, "unt_index", 2);
    check_dim(unt_scores, "unt_scores", 0, n_b);
    check_dim(unt_index, "unt_index", 0, n_b);
    check_dim(unt_index, "unt_index", 1, unt_scores.shape(1));
    const int64_t* ap = in<int64_t>(ans_ptr, "ans_ptr", 1);
    check_dim(ans_ptr, "ans_ptr", 0, n_b + 1);
    const int64_t* ai = in<int64_t>(ans_index, "ans_index", 1);
    const int64_t n_unt = unt_scores.shape(1);
    check_range(tch, t, 0, std::numeric_limits<int64_t>::max(), "touched", "record rows");
    check_range(ui, n_b * n_unt, -1, std::numeric_limits<int64_t>::max(), "unt_index",
                "record rows, -1 for an empty slot", "", n_unt);
    check_answers(ap, n_b, ai, ans_index.shape(0));
    int64_t k_val = int_arg(k_val_arg, "k_val");
    if (k_val < 0) fail_value("k_val must be >= 0, got " + std::to_string(k_val));
    const bool fewer = k_val > t + n_unt;  // no k_val-th candidate anywhere: kth is -inf
    // Past t + n_unt (every candidate) a larger k_val changes nothing but the heap sizes, which
    // kGroup * n_gamma * k_val must not overflow.
    k_val = std::min(k_val, t + n_unt);
    if (n_gamma > 0 && k_val > (std::numeric_limits<int64_t>::max() / 64) / n_gamma)
        fail_value("n_gamma * (t + unt_scores.shape[1]) is too large for the per-query heaps; sweep fewer gammas "
                   "at a time");
    const int threads = threads_arg(n_threads);
    py::array_t<int64_t> hits = output<int64_t>(out, "out", {n_b, n_gamma});
    int64_t* o = hits.mutable_data();
    double* kth = nullptr;
    py::array_t<double> kth_out;
    if (!kth_arg.is_none()) {
        kth_out = output<double>(kth_arg, "kth", {n_b, n_gamma});
        kth = kth_out.mutable_data();
    }
    {
        py::gil_scoped_release nogil;
        if (k_val > 0)  // k_val = 0: an empty top, no heap to read
            nudge_n_sweep(s, h, n_b, t, a, b, n_gamma, tch, us, ui, n_unt, ap, ai, k_val, o, kth, threads);
        else
            std::fill(o, o + n_b * n_gamma, int64_t{0});
        if (kth && (fewer || k_val == 0))
            std::fill(kth, kth + n_b * n_gamma, -std::numeric_limits<double>::infinity());
    }
    return hits;
}

template <typename TE, typename TC>
void run_project(const py::array& E, const py::array& C, const double* a, const double* b, int64_t t, int64_t d,
                 float* o, int threads) {
    const TE* e = in<TE>(E, "E", 2);
    const TC* c = in<TC>(C, "C", 2);
    py::gil_scoped_release nogil;
    project(e, c, a, b, t, d, o, threads);
}

py::array_t<float> py_project(const py::array& E, const py::array& C, const py::array& alpha, const py::array& beta,
                              const py::object& n_threads, const py::object& out_arg) {
    check_ndim(E, "E", 2);
    check_ndim(C, "C", 2);
    const int64_t t = E.shape(0), d = E.shape(1);
    check_dim(C, "C", 0, t);
    check_dim(C, "C", 1, d);
    const double* a = in<double>(alpha, "alpha", 1);
    const double* b = in<double>(beta, "beta", 1);
    check_dim(alpha, "alpha", 0, t);
    check_dim(beta, "beta", 0, t);
    const int threads = threads_arg(n_threads);
    py::array_t<float> out = output<float>(out_arg, "out", {t, d});
    float* o = out.mutable_data();
    const bool e64 = has_dtype<double>(E), c64 = has_dtype<double>(C);
    if (e64 && c64) run_project<double, double>(E, C, a, b, t, d, o, threads);
    else if (e64) run_project<double, float>(E, C, a, b, t, d, o, threads);
    else if (c64) run_project<float, double>(E, C, a, b, t, d, o, threads);
    else run_project<float, float>(E, C, a, b, t, d, o, threads);
    return out;
}

py::array_t<double> py_dot64(const py::array& A, const py::array& B, const py::object& n_threads,
                             const py::object& out_arg) {
    const double* a = in<double>(A, "A", 2);
    const double* b = in<double>(B, "B", 2);
    const int64_t n = A.shape(0), m = B.shape(0), d = A.shape(1);
    check_dim(B, "B", 1, d);
    const int threads = threads_arg(n_threads);
    py::array_t<double> out = output<double>(out_arg, "out", {n, m});
    double* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        dot64(a, b, n, m, d, o, threads);
    }
    return out;
}

py::array_t<double> py_metrics(const py::array& retrieved, const py::array& ans_ptr, const py::array& ans_index,
                               const py::array& ans_rel, const py::object& k_arg, const py::object& n_threads,
                               const py::object& out_arg) {
    const int64_t* r = in<int64_t>(retrieved, "retrieved", 2);
    const int64_t n = retrieved.shape(0);
    const int64_t* ap = in<int64_t>(ans_ptr, "ans_ptr", 1);
    check_dim(ans_ptr, "ans_ptr", 0, n + 1);
    const int64_t* ai = in<int64_t>(ans_index, "ans_index", 1);
    const double* rel = in<double>(ans_rel, "ans_rel", 1);
    check_dim(ans_rel, "ans_rel", 0, ans_index.shape(0));
    const int64_t longest = check_answers(ap, n, ai, ans_index.shape(0));
    int64_t k = int_arg(k_arg, "k");
    if (k < 0) fail_value("k must be >= 0, got " + std::to_string(k));
    // The kernel keeps k discounts; past max(width, longest answer list) a larger k changes nothing.
    const int64_t width = retrieved.shape(1);
    k = std::min(k, std::max(width, longest));
    const int threads = threads_arg(n_threads);
    py::array_t<double> out = output<double>(out_arg, "out", {n, 3});
    double* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        metrics(r, n, width, ap, ai, rel, k, o, threads);
    }
    return out;
}

int64_t py_normalize_rows(const py::array& chunk, py::array& out, const py::object& n_threads) {
    check_ndim(chunk, "chunk", 2);
    const bool f16 = has_dtype(chunk, 'f', 2);
    if (!(f16 || has_dtype<float>(chunk)) || !(chunk.flags() & py::array::c_style))
        fail_type("chunk", "float16 or float32", chunk);
    const int64_t m = chunk.shape(0), d = chunk.shape(1);
    float* o = inout<float>(out, "out", 2);
    check_dim(out, "out", 0, m);
    check_dim(out, "out", 1, d);
    // Rows are normalised in parallel, in any order: out may be chunk itself (float32, in place,
    // each row read before it is written) but must not overlap it otherwise.
    const auto c0 = reinterpret_cast<std::uintptr_t>(chunk.data()), o0 = reinterpret_cast<std::uintptr_t>(o);
    const auto c1 = c0 + static_cast<std::uintptr_t>(chunk.nbytes()), o1 = o0 + static_cast<std::uintptr_t>(out.nbytes());
    if (m * d > 0 && c0 < o1 && o0 < c1 && !(c0 == o0 && !f16))
        fail_value("out overlaps chunk without being chunk itself; pass a separate buffer, or out=chunk "
                   "(float32) to normalise in place");
    const int threads = threads_arg(n_threads);
    py::gil_scoped_release nogil;
    if (f16) return normalize_rows(static_cast<const Half*>(chunk.data()), m, d, o, threads);
    return normalize_rows(static_cast<const float*>(chunk.data()), m, d, o, threads);
}

void py_correct_rows(const py::array& x, const py::array& W0, const py::array& b0, const py::object& W1_arg,
                     const py::object& b1_arg, const py::object& W2_arg, py::array& out, const py::object& n_threads) {
    check_ndim(x, "x", 2);
    const bool f16 = has_dtype(x, 'f', 2);
    if (!(f16 || has_dtype<float>(x)) || !(x.flags() & py::array::c_style)) fail_type("x", "float16 or float32", x);
    const int64_t m = x.shape(0), d_old = x.shape(1);
    const float* w0 = in<float>(W0, "W0", 2);
    check_dim(W0, "W0", 0, d_old);
    const int64_t d_new = W0.shape(1);
    const float* bias0 = in<float>(b0, "b0", 1);
    check_dim(b0, "b0", 0, d_new);
    const int given = !W1_arg.is_none() + !b1_arg.is_none() + !W2_arg.is_none();
    if (given != 0 && given != 3)
        fail_value("W1, b1 and W2 must be given together (the residual MLP) or all be None (the linear map)");
    const float *w1 = nullptr, *bias1 = nullptr, *w2 = nullptr;
    int64_t h = 0;
    if (given) {
        if (!py::isinstance<py::array>(W1_arg) || !py::isinstance<py::array>(b1_arg) ||
            !py::isinstance<py::array>(W2_arg))
            throw py::type_error("nudgefast._cpu: W1, b1 and W2 must be float32 arrays or None");
        const py::array W1 = py::reinterpret_borrow<py::array>(W1_arg), b1 = py::reinterpret_borrow<py::array>(b1_arg),
                        W2 = py::reinterpret_borrow<py::array>(W2_arg);
        w1 = in<float>(W1, "W1", 2);
        check_dim(W1, "W1", 0, d_old);
        h = W1.shape(1);
        bias1 = in<float>(b1, "b1", 1);
        check_dim(b1, "b1", 0, h);
        w2 = in<float>(W2, "W2", 2);
        check_dim(W2, "W2", 0, h);
        check_dim(W2, "W2", 1, d_new);
    }
    float* o = inout<float>(out, "out", 2);
    check_dim(out, "out", 0, m);
    check_dim(out, "out", 1, d_new);
    // Each row tile is read whole before its output rows are written, by one thread: out may be
    // x itself (float32, d_old == d_new), but must not overlap it otherwise.
    const auto x0 = reinterpret_cast<std::uintptr_t>(x.data()), o0 = reinterpret_cast<std::uintptr_t>(o);
    const auto x1 = x0 + static_cast<std::uintptr_t>(x.nbytes()), o1 = o0 + static_cast<std::uintptr_t>(out.nbytes());
    if (m * d_new > 0 && m * d_old > 0 && x0 < o1 && o0 < x1 && !(x0 == o0 && !f16 && d_old == d_new))
        fail_value("out overlaps x without being x itself; pass a separate buffer");
    const int threads = threads_arg(n_threads);
    py::gil_scoped_release nogil;
    if (f16)
        correct_rows(static_cast<const Half*>(x.data()), m, d_old, d_new, h, w0, bias0, w1, bias1, w2, o, threads);
    else
        correct_rows(static_cast<const float*>(x.data()), m, d_old, d_new, h, w0, bias0, w1, bias1, w2, o, threads);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "nudgefast CPU kernels (OpenMP). The op contract is documented in "
              "nudgefast._backends.numpy_backend; call them through nudgefast._backends.cpp_backend. "
              "Ops that return arrays also take out= (the result buffer, checked, fully overwritten).";
    m.attr("MAX_THREADS") = kMaxThreads;

    // The instruction-set level (dispatch.hpp): the best this CPU, its OS and this build support,
    // or NUDGEFAST_CPU_ISA's; a bad value fails the import (ImportError naming the variable).
    init_isa();
    m.attr("ISA_ENV") = kIsaEnv;
    m.def("isa", [] { return std::string(isa_name(active_isa())); },
          "The instruction-set level in use: baseline, avx2, avx512 or amx.");
    m.def("kernel_isa", [] { return std::string(isa_name(kernel_isa())); },
          "The level of the kernels that run: as isa(), but avx512 for amx (no AMX kernel yet).");
    m.def("isa_levels", [] {
              py::list out;
              for (Isa level : supported_isas()) out.append(isa_name(level));
              return out;
          },
          "Levels this CPU, its OS and this build support, lowest first (the last is the default).");
    m.def("set_isa", [](const std::string& name) { set_isa(name); }, py::arg("level"),
          "Switch the level for the whole process (tests compare levels in one process; do not call it "
          "while an op runs). ValueError for an unknown or unsupported level.");
    m.def("cpu_features", [] {
              const CpuFeatures& f = cpu_features();
              py::dict d;
              d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
              d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512dq"] = f.avx512dq;
              d["avx512vl"] = f.avx512vl; d["avx512_vnni"] = f.avx512_vnni; d["avx512_bf16"] = f.avx512_bf16;
              d["avx512_vpopcntdq"] = f.avx512_vpopcntdq; d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16;
              d["amx_int8"] = f.amx_int8; d["os_avx"] = f.os_avx; d["os_avx512"] = f.os_avx512;
              d["os_amx"] = f.os_amx; d["amx_permitted"] = f.amx_permitted;
              return d;
          },
          "What cpuid and the OS report (all False off x86): instruction sets, and whether the OS saves "
          "their registers (os_*) and lets this process use AMX tiles (amx_permitted).");
    const auto threads = py::arg("n_threads") = py::none();
    const auto out = py::arg("out") = py::none();
    m.def("query_gradient", &py_query_gradient, py::arg("queries"), py::arg("order"), py::arg("seg_ptr"), threads, out,
          "(t, d) float64 segmented sum of queries[order] over seg_ptr.");
    m.def("topk_update", &py_topk_update, py::arg("queries"), py::arg("chunk"), py::arg("row_offset"),
          py::arg("exclude"), py::arg("normalize"), py::arg("best_scores"), py::arg("best_index"), threads,
          "Merge a float16/32/64 corpus chunk into the float32 top-k state in place; returns the first bad row or -1.");
    m.def("qtopk_int8", &py_qtopk_int8, py::arg("qcodes"), py::arg("qscale"), py::arg("qoffset"), py::arg("codes"),
          py::arg("row_offset"), py::arg("exclude"), py::arg("signed"), py::arg("low"), py::arg("step"),
          py::arg("normalize"), py::arg("best_scores"), py::arg("best_index"), threads,
          "Merge an int8/uint8 code chunk (int8 queries, exact int32 sums) into the float32 top-k state in place; "
          "returns the first zero-norm row (normalize) or -1.");
    m.def("qtopk_hamming", &py_qtopk_hamming, py::arg("qbits"), py::arg("codes"), py::arg("row_offset"),
          py::arg("exclude"), py::arg("n_bits"), py::arg("best_scores"), py::arg("best_index"), threads,
          "Merge a packed-bit code chunk into the float32 top-k state in place (score n_bits - 2 * Hamming); "
          "returns -1.");
    m.def("dequantize_rows", &py_dequantize_rows, py::arg("codes"), py::arg("signed"), py::arg("low"),
          py::arg("step"), py::arg("out"), threads,
          "out = low + step * u in float32 (u = code + 128 for int8 codes), the rounding of NumPy's float32 "
          "expression.");
    m.def("qtopk_paths", [] {
              py::dict d;
              d["int8"] = qtopk_int8_kernel().name;
              d["hamming"] = qtopk_hamming_kernel().name;
              return d;
          },
          "The kernels qtopk_int8 / qtopk_hamming run at the active level: the level's name, or "
          "avx512-vnni / avx512-vpopcntdq where the CPU has the feature.");
    m.def("set_qtopk_subpaths", [](bool allowed) { set_qtopk_subpaths(allowed); }, py::arg("allowed"),
          "Allow (default) or forbid the avx512 level's AVX512-VNNI / VPOPCNTDQ sub-paths of qtopk_int8 / "
          "qtopk_hamming (tests run the plain avx512 kernels with it; do not call it while an op runs).");
    m.def("nudge_m_intervals", &py_nudge_m_intervals, py::arg("S"), py::arg("G"), py::arg("pair_query"),
          py::arg("s_x"), py::arg("g_x"), py::arg("u_score"), py::arg("eps"), threads, out,
          "(low, high, feasible) per validation pair; out=(low, high, feasible) buffers optional.");
    m.def("nudge_n_sweep", &py_nudge_n_sweep, py::arg("S"), py::arg("H"), py::arg("alpha"), py::arg("beta"),
          py::arg("touched"), py::arg("unt_scores"), py::arg("unt_index"), py::arg("ans_ptr"), py::arg("ans_index"),
          py::arg("k_val"), threads, out, py::arg("kth") = py::none(),
          "(n_b, n_gamma) int64 answer hits in the top-k_val; kth= an (n_b, n_gamma) float64 buffer "
          "gets each k_val-th best score (-inf when fewer candidates).");
    m.def("project", &py_project, py::arg("E"), py::arg("C"), py::arg("alpha"), py::arg("beta"), threads, out,
          "(t, d) float32: alpha[:, None] * E + beta[:, None] * C in float64.");
    m.def("dot64", &py_dot64, py::arg("A"), py::arg("B"), threads, out,
          "(n, m) float64 A @ B.T, each element one FMA chain over k in order (shape-independent).");
    m.def("metrics", &py_metrics, py::arg("retrieved"), py::arg("ans_ptr"), py::arg("ans_index"), py::arg("ans_rel"),
          py::arg("k"), threads, out, "(n, 3) float64 recall@k, ndcg@k, mrr@k (NaN without answers).");
    m.def("correct_rows", &py_correct_rows, py::arg("x"), py::arg("W0"), py::arg("b0"), py::arg("W1"), py::arg("b1"),
          py::arg("W2"), py::arg("out"), threads,
          "out = unit(unit(x) @ W0 + b0 [+ relu(unit(x) @ W1 + b1) @ W2]) into the (m, d_new) float32 out, for "
          "float16/float32 x (m, d_old); NaN rows where a norm is zero or not finite.");
    m.def("normalize_rows", &py_normalize_rows, py::arg("chunk"), py::arg("out"), threads,
          "out[r] = chunk[r] / |chunk[r]| into the (m, d) float32 out; returns the first row of norm zero or not "
          "finite, or -1.");
}
