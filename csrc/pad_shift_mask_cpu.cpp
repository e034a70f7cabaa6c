// C++ CPU backend of pyseqpack.pad_shift_mask: Python sequences / buffers in, padded tensors out, one pass.
//
// Python hands over the padded widths and planning options (psm::Layout) and raw output pointers
// (tensor.data_ptr()), plus the caller's objects themselves: a sequence of rows (lists / tuples of ints, or 1-D
// integer buffers such as numpy arrays; psm_row_lengths, which measures them first, hands them over already
// opened) or one flat 1-D buffer with its offsets. Each example is planned by psm::plan_row (the lines the CUDA
// kernel runs), then its kept tokens are read straight from those objects (PyLong -> int64 for lists, a typed
// strided read for buffers), validated on the way, staged in a small int64 row scratch (or read in place when the
// buffer already is contiguous int64), and every output row is then written by the per-element functions of
// pad_shift_mask.h. Memory traffic: each kept input element is read once (twice when staged, the second time
// from L1), each output element written once.
//
// Python ints need the GIL, so list input runs on the calling thread. When every row is a buffer the GIL is
// released and large batches are split across std::threads by rows.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h>  // PyLongObject's digits (Python.h includes it from 3.11 on)
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "pad_shift_mask.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "buffer formats are read as little-endian");

namespace {

// ---- element types of buffers -----------------------------------------------------------------------------

enum class Elem { kBool, kI8, kU8, kI16, kU16, kI32, kU32, kI64, kU64 };

// Maps a struct-module format ("q", "<i", ">q", "?") and itemsize to an integer element type. Floats and
// anything else are rejected (returns false). A big-endian format (">", "!") sets *swapped, or is rejected
// where the caller cannot swap (swapped == nullptr).
bool parse_format(const Py_buffer& v, Elem* out, bool* swapped = nullptr) {
  const char* f = v.format ? v.format : "B";
  if (swapped != nullptr) *swapped = false;
  if (*f == '>' || *f == '!') {
    if (swapped == nullptr) return false;
    *swapped = true;
    ++f;
  } else if (*f == '@' || *f == '=' || *f == '<') {
    ++f;
  }
  if (f[0] == '\0' || f[1] != '\0') return false;
  const bool is_signed = f[0] == 'b' || f[0] == 'h' || f[0] == 'i' || f[0] == 'l' || f[0] == 'q' || f[0] == 'n';
  const bool is_unsigned = f[0] == 'B' || f[0] == 'H' || f[0] == 'I' || f[0] == 'L' || f[0] == 'Q' || f[0] == 'N';
  if (f[0] == '?' && v.itemsize == 1) {
    *out = Elem::kBool;
    return true;
  }
  if (!is_signed && !is_unsigned) return false;
  switch (v.itemsize) {
    case 1: *out = is_signed ? Elem::kI8 : Elem::kU8; return true;
    case 2: *out = is_signed ? Elem::kI16 : Elem::kU16; return true;
    case 4: *out = is_signed ? Elem::kI32 : Elem::kU32; return true;
    case 8: *out = is_signed ? Elem::kI64 : Elem::kU64; return true;
    default: return false;
  }
}

// A readable name for a rejected buffer format, e.g. "float32" for "f".
std::string format_name(const Py_buffer& v) {
  const char* f = v.format ? v.format : "B";
  if (*f == '@' || *f == '=' || *f == '<') ++f;
  if (f[0] != '\0' && f[1] == '\0') {
    switch (f[0]) {
      case 'e': return "float16";
      case 'f': return "float32";
      case 'd': return "float64";
      case 'Z': return "complex";
    }
  }
  return std::string("format '") + (v.format ? v.format : "B") + "'";
}

// ---- failures: recorded where they happen (possibly without the GIL), raised once with the GIL ------------

enum class Fault { kNone, kType, kOverflow, kRange, kChanged };

struct Field;

struct Failure {
  Fault fault = Fault::kNone;
  const Field* field = nullptr;
  int64_t row = INT64_MAX;  // threads keep their first failure; the smallest row wins
  int64_t index = 0;        // index inside the example (original coordinates)
  int64_t value = 0;
  std::string text;  // type name, or the repr / decimal text of a value out of the int64 range
};

// ---- one input field (input_ids, labels, loss_masks, or an extra) --------------------------------------------

// Where one example's values live: a Python list/tuple (read under the GIL) or a strided typed buffer.
struct RowSource {
  PyObject* seq = nullptr;  // owned reference to a list or tuple
  const char* data = nullptr;
  Py_ssize_t stride = 0;
  Elem elem = Elem::kI64;
  bool swapped = false;  // a big-endian buffer: each element's bytes are reversed when read
  int64_t len = 0;
};

struct Field {
  std::string name;
  int64_t lo = INT64_MIN, hi = INT64_MAX;  // accepted values (the output dtype's range, or 0..1 for masks)
  bool is_mask = false;
  bool flat = false;               // one buffer for the whole batch, indexed through `bases`
  const int64_t* bases = nullptr;  // flat: the offsets [B + 1]; example b is [bases[b], bases[b + 1])
  std::vector<RowSource> rows;     // flat: a single entry
  std::vector<Py_buffer> views;
  std::vector<PyObject*> arrays;   // numpy rows read from their fields (owned references)
  bool has_seq = false;  // some row is a Python sequence: the GIL must be held while reading

  Field() = default;
  Field(const Field&) = delete;
  Field& operator=(const Field&) = delete;
  ~Field() {  // runs with the GIL held (fields are destroyed after the GIL is re-acquired)
    for (auto& r : rows) Py_XDECREF(r.seq);
    for (auto& v : views) PyBuffer_Release(&v);
    for (PyObject* a : arrays) Py_DECREF(a);
  }
};

// ---- numpy rows, read without numpy's headers ----------------------------------------------------------------
//
// The build needs nothing but Python's headers, so buffers are opened through the buffer protocol. For numpy
// rows that is most of the per-row cost of a numpy batch: a call through numpy's exporter, which builds a
// format string the first time an array is exported. The leading fields of numpy's array and dtype objects
// have one layout in numpy 1.x and 2.x (numpy's ABI: its PyArray_DATA, PyArray_NDIM, ... accessors read them):
//   array  PyObject_HEAD, char* data, int nd, npy_intp* dimensions, npy_intp* strides, PyObject* base,
//          PyArray_Descr* descr, int flags
//   dtype  PyObject_HEAD, PyTypeObject* typeobj, char kind, char type, char byteorder, char flags, int type_num
// so an exact numpy.ndarray of one dimension and a builtin integer type in native byte order is read from
// a few pointer reads; anything else goes through the buffer protocol. Each entry point first makes sure this
// layout was checked against the buffer protocol on probe arrays, once numpy is imported (no array exists
// before), and before it reads any row: the check runs Python code. The fast path stays off if anything
// differs.
struct NpArrayHead {
  PyObject_HEAD
  char* data;
  int nd;
  Py_ssize_t* dimensions;
  Py_ssize_t* strides;
  PyObject* base;
  PyObject* descr;
  int flags;
};
struct NpDescrHead {
  PyObject_HEAD
  PyTypeObject* typeobj;
  char kind, type, byteorder, flags;
  int type_num;
};

// numpy's builtin type numbers (NPY_BOOL = 0 ... NPY_ULONGLONG = 10), the same in every numpy version.
bool numpy_elem(int type_num, Elem* out) {
  constexpr bool long64 = sizeof(long) == 8;
  switch (type_num) {
    case 0: *out = Elem::kBool; return true;
    case 1: *out = Elem::kI8; return true;
    case 2: *out = Elem::kU8; return true;
    case 3: *out = Elem::kI16; return true;
    case 4: *out = Elem::kU16; return true;
    case 5: *out = Elem::kI32; return true;
    case 6: *out = Elem::kU32; return true;
    case 7: *out = long64 ? Elem::kI64 : Elem::kI32; return true;
    case 8: *out = long64 ? Elem::kU64 : Elem::kU32; return true;
    case 9: *out = Elem::kI64; return true;
    case 10: *out = Elem::kU64; return true;
    default: return false;
  }
}

PyTypeObject* g_ndarray = nullptr;  // numpy.ndarray once its layout is checked
int g_numpy_state = 0;              // 0: not checked yet, 1: fast path on, -1: off

// `obj` read from numpy's fields when it is an exact ndarray of one dimension and a builtin integer type in
// native byte order; false leaves `out` alone. Trusted only once the layout check passed (open_ndarray).
bool read_ndarray_fields(PyObject* obj, RowSource* out) {
  if (Py_TYPE(obj) != g_ndarray) return false;
  const auto* a = reinterpret_cast<const NpArrayHead*>(obj);
  const auto* d = reinterpret_cast<const NpDescrHead*>(a->descr);
  Elem elem;
  if (a->nd != 1 || d->byteorder == '>' || !numpy_elem(d->type_num, &elem)) return false;
  out->data = a->data;
  out->stride = a->strides[0];
  out->elem = elem;
  out->len = a->dimensions[0];
  return true;
}

// The layout check: reading probe arrays (every integer type, strided, and the ones that must be declined)
// from numpy's fields gives what the buffer protocol gives. `np` is the numpy module.
void check_numpy_layout(PyObject* np) {
  g_numpy_state = -1;
  PyObject* ty = PyObject_GetAttrString(np, "ndarray");
  if (ty == nullptr || !PyType_Check(ty)) {
    Py_XDECREF(ty);
    PyErr_Clear();
    return;
  }
  g_ndarray = reinterpret_cast<PyTypeObject*>(ty);  // kept: a reference for the life of the process
  bool ok = true;
  const char* kinds[] = {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
                         "intc", "int_", "longlong", ">i4", "float32"};
  PyObject* two = PyLong_FromLong(2);
  PyObject* every_other = two ? PySlice_New(nullptr, nullptr, two) : nullptr;  // [::2]: a strided view
  Py_XDECREF(two);
  for (const char* kind : kinds) {
    if (!ok) break;
    PyObject* base = PyObject_CallMethod(np, "arange", "i", 7);
    PyObject* typed = base ? PyObject_CallMethod(base, "astype", "s", kind) : nullptr;
    PyObject* probe = typed && every_other ? PyObject_GetItem(typed, every_other) : nullptr;
    if (probe == nullptr) {
      ok = false;
    } else {
      RowSource fast;
      const bool read = read_ndarray_fields(probe, &fast);
      Py_buffer v;
      if (PyObject_GetBuffer(probe, &v, PyBUF_RECORDS_RO) < 0) {
        ok = false;
      } else {
        Elem elem;
        const bool integer = parse_format(v, &elem);
        // Integer probes in native order must read alike; the others (big-endian, float) must be declined.
        ok = integer && kind[0] != '>' ? read && fast.data == v.buf && fast.len == v.shape[0] &&
                                             fast.stride == v.strides[0] && fast.elem == elem
                                       : !read;
        PyBuffer_Release(&v);
      }
    }
    Py_XDECREF(probe);
    Py_XDECREF(typed);
    Py_XDECREF(base);
  }
  Py_XDECREF(every_other);
  if (PyErr_Occurred()) PyErr_Clear();
  g_numpy_state = ok ? 1 : -1;
}

// Runs the layout check once numpy is imported (it runs Python code: call it before reading any row). With
// `import_numpy`, imports numpy to check it (for numpy_rows_fast).
void ensure_numpy_checked(bool import_numpy = false) {
  if (g_numpy_state != 0) return;
  static PyObject* const name = PyUnicode_InternFromString("numpy");  // kept for the life of the process
  PyObject* np = name == nullptr ? nullptr : import_numpy ? PyImport_Import(name) : PyImport_GetModule(name);
  if (np != nullptr) check_numpy_layout(np);
  Py_XDECREF(np);
  PyErr_Clear();
}

// Opens a numpy row from its fields when the fast path applies (true, a reference kept in `f`).
bool open_ndarray(PyObject* obj, Field& f, RowSource* out) {
  if (g_numpy_state != 1 || !read_ndarray_fields(obj, out)) return false;
  Py_INCREF(obj);
  f.arrays.push_back(obj);
  return true;
}

// Where example b's values lie: [start, end) of the flat buffer, or [0, len) of its own row.
void bounds(const Field& f, int64_t b, int64_t* start, int64_t* end) {
  if (f.flat) {
    *start = f.bases[b];
    *end = f.bases[b + 1];
  } else {
    *start = 0;
    *end = f.rows[static_cast<size_t>(b)].len;
  }
}

// Raises `type` with "name[b]: what" (or "name: what" for a flat buffer, b < 0); returns false.
bool source_error(PyObject* type, const Field& f, int64_t b, const std::string& what) {
  if (b < 0)
    PyErr_Format(type, "%s: %s", f.name.c_str(), what.c_str());
  else
    PyErr_Format(type, "%s[%lld]: %s", f.name.c_str(), static_cast<long long>(b), what.c_str());
  return false;
}

// Opens one example (or the flat buffer when b < 0). Sets a Python exception and returns false on error.
bool open_source(PyObject* obj, Field& f, int64_t b, RowSource* out) {
  if (PyList_Check(obj) || PyTuple_Check(obj)) {
    Py_INCREF(obj);
    out->seq = obj;
    out->len = PySequence_Fast_GET_SIZE(obj);
    f.has_seq = true;
    return true;
  }
  if (open_ndarray(obj, f, out)) return true;
  if (PyObject_CheckBuffer(obj)) {
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_RECORDS_RO) < 0) {
      PyObject *type, *value, *tb;
      PyErr_Fetch(&type, &value, &tb);
      PyObject* msg = value ? PyObject_Str(value) : nullptr;
      const std::string why = msg ? PyUnicode_AsUTF8(msg) : "unreadable buffer";
      Py_XDECREF(msg);
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
      PyErr_Clear();
      return source_error(PyExc_TypeError, f, b, "cannot read the buffer (" + why + ")");
    }
    f.views.push_back(v);
    Elem elem;
    if (v.ndim != 1) {
      return source_error(PyExc_TypeError, f, b,
                          "expected a 1-D sequence, got a " + std::to_string(v.ndim) + "-D array");
    }
    if (!parse_format(v, &elem, &out->swapped)) {
      return source_error(PyExc_TypeError, f, b, "expected integer values, got a " + format_name(v) + " array");
    }
    out->data = static_cast<const char*>(v.buf);
    out->stride = v.strides ? v.strides[0] : v.itemsize;
    out->elem = elem;
    out->len = v.shape ? v.shape[0] : v.len / v.itemsize;
    return true;
  }
  if (b >= 0 && PySequence_Check(obj) && !PyUnicode_Check(obj)) {  // range, deque, ...: one list copy
    PyObject* s = PySequence_Fast(obj, "");
    if (s == nullptr) return false;
    out->seq = s;
    out->len = PySequence_Fast_GET_SIZE(s);
    f.has_seq = true;
    return true;
  }
  return source_error(PyExc_TypeError, f, b,
                      std::string(b < 0 ? "expected a 1-D integer array, got "
                                        : "expected a sequence of ints (list, tuple, 1-D integer array), got ") +
                          Py_TYPE(obj)->tp_name);
}

// Opens a field: `obj` is a flat buffer (flat = true) or a sequence of B rows.
bool open_field(PyObject* obj, Field& f, int64_t B, bool flat) {
  f.flat = flat;
  if (flat) {
    f.rows.resize(1);
    return open_source(obj, f, -1, &f.rows[0]);
  }
  PyObject* seq = PySequence_Fast(obj, "expected a sequence of rows");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != B) {
    Py_DECREF(seq);
    PyErr_Format(PyExc_ValueError, "%s: expected %lld rows, got %lld", f.name.c_str(), static_cast<long long>(B),
                 static_cast<long long>(n));
    return false;
  }
  f.rows.resize(static_cast<size_t>(B));
  f.views.reserve(static_cast<size_t>(B));
  bool ok = true;
  for (int64_t b = 0; b < B && ok; ++b) ok = open_source(PySequence_Fast_GET_ITEM(seq, b), f, b, &f.rows[b]);
  Py_DECREF(seq);
  return ok;
}

// psm_row_lengths hands the rows it opened back to Python in a capsule of this name, holding a heap Field (its
// buffers stay acquired, its lists and arrays referenced); psm_fill and psm_gather take that capsule in place of
// the rows, so each row is opened once per call, not twice.
constexpr const char* kOpenedRows = "pyseqpack._C.opened_rows";

// The field to read: the capsule's (rows already opened, its name set when measured), or `obj` opened into
// `own` as field `name` (flat when `bases`, its offsets, is not null). nullptr with a Python error set.
Field* use_field(PyObject* obj, const char* name, const int64_t* bases, int64_t B, Field& own) {
  if (PyCapsule_IsValid(obj, kOpenedRows)) {
    auto* f = static_cast<Field*>(PyCapsule_GetPointer(obj, kOpenedRows));
    if (bases != nullptr || static_cast<int64_t>(f->rows.size()) != B) {
      PyErr_Format(PyExc_ValueError, "pyseqpack._C: %s: opened rows need no offsets and must number %lld", name,
                   static_cast<long long>(B));
      return nullptr;
    }
    return f;
  }
  own.name = name;
  own.bases = bases;
  return open_field(obj, own, B, bases != nullptr) ? &own : nullptr;
}

// ---- reading one example's kept values into int64 --------------------------------------------------------

bool fail(Failure* fl, Fault fault, const Field& f, int64_t b, int64_t index, int64_t value, std::string text = {}) {
  fl->fault = fault;
  fl->field = &f;
  fl->row = b;
  fl->index = index;
  fl->value = value;
  fl->text = std::move(text);
  return false;
}

bool in_range(const Field& f, int64_t v) { return v >= f.lo && v <= f.hi; }

// One element of type T at p, which may be unaligned (numpy views), its bytes reversed when Swap.
template <typename T, bool Swap>
inline T load(const char* p) {
  T x;
  std::memcpy(&x, p, sizeof(T));
  if constexpr (Swap && sizeof(T) == 2) x = static_cast<T>(__builtin_bswap16(static_cast<uint16_t>(x)));
  if constexpr (Swap && sizeof(T) == 4) x = static_cast<T>(__builtin_bswap32(static_cast<uint32_t>(x)));
  if constexpr (Swap && sizeof(T) == 8) x = static_cast<T>(__builtin_bswap64(static_cast<uint64_t>(x)));
  return x;
}

template <typename T, bool Swap>
bool read_buffer(const RowSource& s, const Field& f, int64_t b, int64_t start, int64_t count, int64_t base,
                 int64_t* dst, Failure* fl) {
  // Locals, not Field / RowSource members: dst stores could alias them (a reload per element otherwise).
  const Py_ssize_t stride = s.stride;
  const int64_t lo = f.lo, hi = f.hi;
  const char* p = s.data + start * stride;
  if constexpr (!std::is_same_v<T, uint64_t>) {
    // Every T fits the accepted range (say int32 or uint16 values for int64 outputs): nothing to check, and a
    // contiguous row converts in a plain loop that the compiler vectorizes.
    if (lo <= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
        hi >= static_cast<int64_t>(std::numeric_limits<T>::max()) && stride == static_cast<Py_ssize_t>(sizeof(T))) {
      for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<int64_t>(load<T, Swap>(p + k * sizeof(T)));
      return true;
    }
  }
  for (int64_t k = 0; k < count; ++k, p += stride) {
    const T x = load<T, Swap>(p);
    if constexpr (std::is_same_v<T, uint64_t>) {
      if (x > static_cast<uint64_t>(INT64_MAX)) return fail(fl, Fault::kOverflow, f, b, start - base + k, 0, std::to_string(x));
    }
    const int64_t v = static_cast<int64_t>(x);
    if (v < lo || v > hi) return fail(fl, Fault::kRange, f, b, start - base + k, v);
    dst[k] = v;
  }
  return true;
}

// A Python int of one internal digit (|v| < 2**30: every token id) read without a call; false for anything else.
// It reads the digit in place, where PyLong_AsLongLongAndOverflow is a call with overflow bookkeeping per token.
inline bool compact_long(PyObject* o, long long* v) {
#if PY_VERSION_HEX >= 0x030C0000
  if (!PyLong_CheckExact(o) || !PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) return false;
  *v = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o));
#else
  if (!PyLong_CheckExact(o)) return false;
  const Py_ssize_t size = Py_SIZE(o);  // signed digit count
  if (size < -1 || size > 1) return false;
  *v = size == 0 ? 0 : size * static_cast<long long>(reinterpret_cast<PyLongObject*>(o)->ob_digit[0]);
#endif
  return true;
}

// repr(o) for an error message (GIL held).
std::string repr(PyObject* o) {
  PyObject* r = PyObject_Repr(o);
  std::string text = r ? PyUnicode_AsUTF8(r) : "value";
  Py_XDECREF(r);
  PyErr_Clear();
  return text;
}

// Python objects -> int64 (GIL held). Small Python ints take the inline path; other ints (bool included) and
// objects with __index__ (numpy integer scalars) the general one; anything else (float, str, None) fails.
bool read_sequence(const RowSource& s, const Field& f, int64_t b, int64_t start, int64_t count, int64_t* dst,
                   Failure* fl) {
  // The hot loop reads small ints only, which runs no Python code, so the list cannot change under it: its length
  // is checked once here, and again only after the general path, where __index__ may run Python code that
  // resizes it. The accepted range is copied into locals: dst stores could alias the Field, which would force
  // a reload of both bounds per element.
  PyObject** items = PySequence_Fast_ITEMS(s.seq);
  if (start + count > PySequence_Fast_GET_SIZE(s.seq)) return fail(fl, Fault::kChanged, f, b, start, 0);
  const int64_t lo = f.lo, hi = f.hi;
  for (int64_t k = 0; k < count; ++k) {
    PyObject* o = items[start + k];
    long long x;
    if (!compact_long(o, &x)) {
      PyObject* i;
      if (PyLong_Check(o)) {
        Py_INCREF(o);
        i = o;
      } else if (PyIndex_Check(o)) {
        Py_INCREF(o);
        i = PyNumber_Index(o);  // may run Python code that resizes the list: it is re-read below
        if (i == nullptr) {
          PyErr_Clear();
          std::string tname = Py_TYPE(o)->tp_name;
          Py_DECREF(o);
          return fail(fl, Fault::kType, f, b, start + k, 0, std::move(tname));
        }
        Py_DECREF(o);
        items = PySequence_Fast_ITEMS(s.seq);
        if (start + count > PySequence_Fast_GET_SIZE(s.seq)) {
          Py_DECREF(i);
          return fail(fl, Fault::kChanged, f, b, start + k, 0);
        }
      } else {
        return fail(fl, Fault::kType, f, b, start + k, 0, Py_TYPE(o)->tp_name);
      }
      int overflow = 0;
      x = PyLong_AsLongLongAndOverflow(i, &overflow);
      if (overflow != 0) {
        std::string text = repr(i);
        Py_DECREF(i);
        return fail(fl, Fault::kOverflow, f, b, start + k, 0, std::move(text));
      }
      Py_DECREF(i);
    }
    if (x < lo || x > hi) return fail(fl, Fault::kRange, f, b, start + k, x);
    dst[k] = x;
  }
  return true;
}

// read_buffer for the source's element type.
template <bool Swap>
bool read_typed(const RowSource& s, const Field& f, int64_t b, int64_t start, int64_t count, int64_t base,
                int64_t* dst, Failure* fl) {
  switch (s.elem) {
    case Elem::kBool:
    case Elem::kU8: return read_buffer<uint8_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kI8: return read_buffer<int8_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kI16: return read_buffer<int16_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kU16: return read_buffer<uint16_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kI32: return read_buffer<int32_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kU32: return read_buffer<uint32_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kI64: return read_buffer<int64_t, Swap>(s, f, b, start, count, base, dst, fl);
    case Elem::kU64: return read_buffer<uint64_t, Swap>(s, f, b, start, count, base, dst, fl);
  }
  return false;
}

// Points *out at example b's values [rel, rel + count) as int64, `rel` counted from the example's first value
// (whatever the field's form: its own row, or its window of a flat buffer), so that fields of different forms
// line up; element k of *out is the k-th kept value. In place, or staged in `scratch`. Returns false after
// recording a failure.
bool stage(const Field& f, int64_t b, int64_t rel, int64_t count, std::vector<int64_t>& scratch,
           const int64_t** out, Failure* fl) {
  const RowSource& s = f.flat ? f.rows[0] : f.rows[b];
  const int64_t base = f.flat ? f.bases[b] : 0;
  const int64_t end = f.flat ? std::min<int64_t>(f.bases[b + 1], s.len) : s.len;
  const int64_t start = base + rel;
  if (rel < 0 || count < 0 || count > end - start) return fail(fl, Fault::kChanged, f, b, rel, 0);
  if (s.seq == nullptr && s.elem == Elem::kI64 && !s.swapped && s.stride == 8 &&
      reinterpret_cast<uintptr_t>(s.data) % alignof(int64_t) == 0) {
    const int64_t* p = reinterpret_cast<const int64_t*>(s.data) + start;
    if (f.lo != INT64_MIN || f.hi != INT64_MAX) {
      for (int64_t k = 0; k < count; ++k)
        if (!in_range(f, p[k])) return fail(fl, Fault::kRange, f, b, start - base + k, p[k]);
    }
    *out = p;
    return true;
  }
  if (static_cast<int64_t>(scratch.size()) < count) scratch.resize(static_cast<size_t>(count));
  int64_t* dst = scratch.data();  // may be nullptr when count == 0: then it is never dereferenced
  *out = dst;
  if (s.seq != nullptr) return read_sequence(s, f, b, start, count, dst, fl);
  return s.swapped ? read_typed<true>(s, f, b, start, count, base, dst, fl)
                   : read_typed<false>(s, f, b, start, count, base, dst, fl);
}

void raise_failure(const Failure& fl) {
  const char* name = fl.field->name.c_str();
  const long long b = fl.row, i = fl.index, v = fl.value;
  switch (fl.fault) {
    case Fault::kType:
      PyErr_Format(PyExc_TypeError, "%s[%lld][%lld]: expected an int, got %s", name, b, i, fl.text.c_str());
      break;
    case Fault::kOverflow:
      PyErr_Format(PyExc_ValueError, "%s[%lld][%lld]: %s is out of the int64 range", name, b, i, fl.text.c_str());
      break;
    case Fault::kRange:
      if (fl.field->is_mask)
        PyErr_Format(PyExc_ValueError, "%s[%lld][%lld]: expected 0 or 1, got %lld", name, b, i, v);
      else
        PyErr_Format(PyExc_ValueError, "%s[%lld][%lld]: %lld does not fit in the output dtype int32", name, b, i, v);
      break;
    case Fault::kChanged:
      PyErr_Format(PyExc_RuntimeError,
                   "%s[%lld]: the data does not match its length when the batch was measured (did the example "
                   "change while pad_shift_mask was reading it?)", name, b);
      break;
    case Fault::kNone:
      break;
  }
}

// ---- the per-row kernel -------------------------------------------------------------------------------------

// The output loops below evaluate the per-element functions of pad_shift_mask.h (what the CUDA kernel runs,
// one thread per element) by column segments. Once row() has checked 0 <= kept <= width, an output row is
// [0, col) padding, [col, col + kept) the kept values and [col + kept, width) padding, and inside the middle
// segment is_kept() holds. So each loop is a fill, a copy, or a branch-free select on values it may read
// unconditionally: they vectorize into plain stores and loads (no masked loads), and the row costs about what
// copying its bytes costs. The labels are built once per row, in the int64 labels output itself or else in an
// int64 scratch row (L1-resident), from which shift_labels and decoder_input_ids are copied. Parity with the reference is what the tests check.
// Baseline x86-64 (SSE2) has no 64-bit vector compare, so the selects only vectorize with AVX2: on x86-64
// Linux each writer is compiled twice and the loader picks the AVX2 clone when the CPU has it (GCC/Clang
// function multiversioning); elsewhere one plain version.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define PSM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PSM_SIMD_CLONES
#endif
#define PSM_ALWAYS_INLINE inline __attribute__((always_inline))

using psm::kAttn, psm::kDecoder, psm::kIds, psm::kLabels, psm::kLoss, psm::kNumOut, psm::kPos, psm::kShift;

// One example: its Row (psm::plan_row, with kept <= width checked), its staged inputs (row pointers indexed by
// the kept index) and its output rows.
struct RowJob {
  psm::Row r;
  const int64_t* tok;
  const int64_t* mask;  // nullptr: no loss masks
  const int64_t* lab;   // nullptr: labels are not given separately
  int64_t* label_row;   // scratch of Ll values: the padded labels
  int64_t L, Ll, pad, label_pad, decoder_start;
  int32_t kind;
  void* out[kNumOut];  // row b of each output, nullptr when not requested
};

template <typename OutT>
PSM_ALWAYS_INLINE void fill(OutT* o, int64_t from, int64_t to, int64_t v) {
  for (int64_t j = from; j < to; ++j) o[j] = static_cast<OutT>(v);
}

// input_id / extra / given_label: pad, the kept values, pad.
template <typename OutT>
PSM_ALWAYS_INLINE void place(OutT* o, int64_t width, int64_t col, int64_t kept, const int64_t* x, int64_t pad) {
  fill(o, 0, col, pad);
  OutT* body = o + col;
  for (int64_t k = 0; k < kept; ++k) body[k] = static_cast<OutT>(x[k]);
  fill(o, col + kept, width, pad);
}

template <typename OutT>
PSM_ALWAYS_INLINE void write_outputs(const RowJob& job) {
  // Locals, not job fields: an OutT store could alias them, which would force a reload per element and keep
  // the loops from vectorizing.
  const psm::Row r = job.r;
  const int64_t *t = job.tok, *m = job.mask, *g = job.lab;
  const int64_t L = job.L, Ll = job.Ll, pad = job.pad, label_pad = job.label_pad, start = job.decoder_start;
  const int64_t col = r.tok_col, kept = r.tok_kept, end = col + kept;
  // [B, L] outputs.
  if (auto* o = static_cast<OutT*>(job.out[kIds])) place(o, L, col, kept, t, pad);
  if (auto* o = static_cast<OutT*>(job.out[kAttn])) {
    fill(o, 0, col, 0);
    fill(o, col, end, 1);
    fill(o, end, L, 0);
  }
  if (auto* o = static_cast<OutT*>(job.out[kPos])) {  // clamp(j - col, 0, max(kept - 1, 0))
    fill(o, 0, col, 0);
    for (int64_t k = 0; k < kept; ++k) o[col + k] = static_cast<OutT>(k);
    fill(o, end, L, kept > 0 ? kept - 1 : 0);
  }
  if (auto* o = static_cast<OutT*>(job.out[kLoss])) {  // kept, k >= loss_from, and not the last kept token
    fill(o, 0, col, 0);
    for (int64_t k = 0; k < kept; ++k) o[col + k] = static_cast<OutT>(k >= r.loss_from && k != kept - 1);
    fill(o, end, L, 0);
  }
  // [B, Ll] outputs, from the padded labels.
  if (job.kind == psm::kNoLabels || !(job.out[kLabels] || job.out[kShift] || job.out[kDecoder])) return;
  // int64 outputs: the labels row itself is the scratch (one pass less).
  int64_t* lr = job.label_row;
  if constexpr (std::is_same_v<OutT, int64_t>) {
    if (job.out[kLabels] != nullptr) lr = static_cast<int64_t*>(job.out[kLabels]);
  }
  if (job.kind == psm::kGivenLabels) {
    place(lr, Ll, r.lab_col, r.lab_kept, g, label_pad);
  } else {  // derived: the prompt (k < label_from) and tokens whose loss mask is 0 become label_pad
    const int64_t from = r.label_from < kept ? r.label_from : kept;
    fill(lr, 0, col + from, label_pad);
    if (m != nullptr)
      for (int64_t k = from; k < kept; ++k) lr[col + k] = m[k] != 0 ? t[k] : label_pad;
    else
      for (int64_t k = from; k < kept; ++k) lr[col + k] = t[k];
    fill(lr, end, Ll, label_pad);
  }
  if (auto* o = static_cast<OutT*>(job.out[kLabels]); o != nullptr && static_cast<void*>(o) != lr)
    for (int64_t j = 0; j < Ll; ++j) o[j] = static_cast<OutT>(lr[j]);
  if (Ll == 0) return;
  if (auto* o = static_cast<OutT*>(job.out[kShift])) {  // labels[j + 1]; nothing follows the last column
    for (int64_t j = 0; j + 1 < Ll; ++j) o[j] = static_cast<OutT>(lr[j + 1]);
    o[Ll - 1] = static_cast<OutT>(label_pad);
  }
  if (auto* o = static_cast<OutT*>(job.out[kDecoder])) {  // start, then labels[j - 1]; -100 becomes pad
    o[0] = static_cast<OutT>(start == psm::kIgnoreLabel ? pad : start);
    for (int64_t j = 1; j < Ll; ++j) o[j] = static_cast<OutT>(lr[j - 1] == psm::kIgnoreLabel ? pad : lr[j - 1]);
  }
}

PSM_SIMD_CLONES void write_outputs_i32(const RowJob& job) { write_outputs<int32_t>(job); }
PSM_SIMD_CLONES void write_outputs_i64(const RowJob& job) { write_outputs<int64_t>(job); }

PSM_SIMD_CLONES void write_extra_i32(const psm::Row r, const int64_t* x, int64_t pad, int64_t L, void* out) {
  place(static_cast<int32_t*>(out), L, r.tok_col, r.tok_kept, x, pad);
}
PSM_SIMD_CLONES void write_extra_i64(const psm::Row r, const int64_t* x, int64_t pad, int64_t L, void* out) {
  place(static_cast<int64_t*>(out), L, r.tok_col, r.tok_kept, x, pad);
}

struct Scratch {
  std::vector<int64_t> tok, mask, lab, extra, label_row;
};

struct Problem {
  psm::Layout layout{};  // L, Ll and the planning options
  int32_t kind = psm::kNoLabels;
  const int64_t* prompt = nullptr;  // prompt lengths [B], or nullptr
  // The fields: opened by psm_fill into the *_own storage, or the ones psm_row_lengths opened (capsules).
  Field tok_own, lab_own, mask_own;
  std::vector<Field> extras_own;
  Field *tok = &tok_own, *lab = &lab_own, *mask = &mask_own;
  std::vector<Field*> extras;
  std::vector<int64_t> extra_pads;
  void* out[kNumOut] = {};
  std::vector<void*> extra_out;
  int64_t pad = 0, label_pad = 0, decoder_start = 0;
  int64_t itemsize = 8;
  bool has_mask = false;

  bool needs_gil() const {
    if (tok->has_seq || lab->has_seq || mask->has_seq) return true;
    for (const Field* e : extras)
      if (e->has_seq) return true;
    return false;
  }

  // Example b: plan it, stage its inputs (this is where values are read and validated), then write its output
  // rows.
  bool row(int64_t b, Scratch& s, Failure* fl) const {
    const int64_t L = layout.L, Ll = layout.Ll;
    int64_t tok_start, tok_end, lab_start = 0, lab_end = 0;
    bounds(*tok, b, &tok_start, &tok_end);
    if (kind == psm::kGivenLabels) bounds(*lab, b, &lab_start, &lab_end);
    if (static_cast<int64_t>(s.label_row.size()) < Ll) s.label_row.resize(static_cast<size_t>(Ll));
    RowJob job{psm::plan_row(tok_start, tok_end, lab_start, lab_end, kind, prompt != nullptr,
                             prompt != nullptr ? prompt[b] : 0, layout),
               nullptr, nullptr, nullptr, s.label_row.data(), L, Ll, pad, label_pad, decoder_start, kind, {}};
    const psm::Row& r = job.r;
    // Python measured the widths from the same lengths: a longer row means the example changed meanwhile. From
    // here on 0 <= kept <= width, which the column segments of write_outputs rely on.
    if (r.tok_kept > L) return fail(fl, Fault::kChanged, *tok, b, 0, 0);
    if (r.lab_kept > Ll) return fail(fl, Fault::kChanged, *lab, b, 0, 0);
    // Kept values start `tok_rel` (`lab_rel`) values into the example: the same for the fields aligned with
    // the tokens, whichever form each has.
    const int64_t tok_rel = r.tok_src - tok_start, lab_rel = r.lab_src - lab_start;
    if (!stage(*tok, b, tok_rel, r.tok_kept, s.tok, &job.tok, fl)) return false;
    if (kind == psm::kDerivedLabels && has_mask && !stage(*mask, b, tok_rel, r.tok_kept, s.mask, &job.mask, fl))
      return false;
    if (kind == psm::kGivenLabels && !stage(*lab, b, lab_rel, r.lab_kept, s.lab, &job.lab, fl)) return false;
    for (int i = 0; i < kNumOut; ++i) {
      const int64_t width = psm::label_width(i) ? Ll : L;
      job.out[i] = out[i] ? static_cast<char*>(out[i]) + b * width * itemsize : nullptr;
    }
    (itemsize == 4 ? write_outputs_i32 : write_outputs_i64)(job);
    for (size_t e = 0; e < extras.size(); ++e) {
      const int64_t* x = nullptr;
      if (!stage(*extras[e], b, tok_rel, r.tok_kept, s.extra, &x, fl)) return false;
      void* o = static_cast<char*>(extra_out[e]) + b * L * itemsize;
      (itemsize == 4 ? write_extra_i32 : write_extra_i64)(r, x, extra_pads[e], L, o);
    }
    return true;
  }

  void rows(int64_t b0, int64_t b1, Failure* fl) const {
    Scratch s;
    for (int64_t b = b0; b < b1; ++b)
      if (!row(b, s, fl)) return;
  }
};

// ---- argument helpers ------------------------------------------------------------------------------------------

// A read-only view of an int64 array passed from Python (offsets [B + 1], prompt lengths [B]); released on exit.
struct Int64View {
  Py_buffer view{};
  const int64_t* data = nullptr;
  Int64View() = default;
  Int64View(const Int64View&) = delete;
  Int64View& operator=(const Int64View&) = delete;
  ~Int64View() {
    if (view.obj != nullptr) PyBuffer_Release(&view);
  }
  // `obj` must be a C-contiguous int64 buffer of at least `count` elements (None allowed when `optional`).
  bool open(PyObject* obj, const char* what, int64_t count, bool optional) {
    if (obj == Py_None && optional) return true;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return false;
    Elem elem;
    if (!parse_format(view, &elem) || elem != Elem::kI64 || view.len < count * 8) {
      PyErr_Format(PyExc_TypeError, "pyseqpack._C: %s must be a C-contiguous int64 array of >= %lld values", what,
                   static_cast<long long>(count));
      return false;
    }
    data = static_cast<const int64_t*>(view.buf);
    return true;
  }
};

bool as_i64(PyObject* o, const char* what, int64_t* v) {
  *v = PyLong_AsLongLong(o);
  if (*v == -1 && PyErr_Occurred()) {
    PyErr_Format(PyExc_TypeError, "pyseqpack._C: argument %s must be an int", what);
    return false;
  }
  return true;
}

template <typename T>
T* as_ptr(PyObject* o, const char* what, bool* ok) {
  const unsigned long long p = PyLong_AsUnsignedLongLong(o);
  if (p == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Format(PyExc_TypeError, "pyseqpack._C: argument %s must be an address (int)", what);
    *ok = false;
    return nullptr;
  }
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

// Sets a field's accepted range: the output dtype's for values, 0..1 for masks.
void set_range(Field& f, int64_t itemsize, bool is_mask) {
  f.is_mask = is_mask;
  if (is_mask) {
    f.lo = 0;
    f.hi = 1;
  } else if (itemsize == 4) {
    f.lo = INT32_MIN;
    f.hi = INT32_MAX;
  }
}

// Threads for one fill: `requested` (> 0) exactly, at most one per example; else (0) by size, at most
// `max_threads` (Python passes torch.get_num_threads(), which DataLoader workers set to 1). Starting a
// std::thread costs about as much as writing a few hundred kilobytes, and the threads share the memory
// bandwidth, so a thread only pays off with megabytes to write: one thread per 2^19 output elements (4 MB of
// int64) of work, and a single thread below twice that.
int64_t choose_threads(int64_t requested, int64_t max_threads, int64_t B, int64_t work) {
  if (requested > 0) return std::max<int64_t>(1, std::min(requested, B));
  const int64_t per_thread = int64_t{1} << 19;
  if (work < 2 * per_thread) return 1;
  return std::max<int64_t>(1, std::min({max_threads, B, work / per_thread}));
}

}  // namespace

// ---- Python entry points ----------------------------------------------------------------------------------------

// numpy_rows_fast() -> bool: whether numpy rows are read from numpy's fields (see "numpy rows" above), checking
// the layout first if that was not done yet (importing numpy; False without it). For the environment report and
// the tests.
PyObject* numpy_rows_fast(PyObject*, PyObject*) {
  ensure_numpy_checked(true);
  return PyBool_FromLong(g_numpy_state == 1);
}

// psm_row_lengths(rows, name) -> (bytes of len(rows) int64 lengths, other: bool, longest, shortest, opened).
// Checks that every row is a list / tuple, a 1-D integer buffer or another sequence (error names `name[b]`);
// reads no element. `other` is True when some row is neither a list / tuple nor a buffer (e.g. a tensor, which
// Python converts first); otherwise `opened` is a capsule holding the opened rows, which psm_fill and
// psm_gather take in place of `rows` (None when `other`). longest / shortest: the extreme lengths (0 for an
// empty batch).
PyObject* psm_row_lengths(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyUnicode_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "psm_row_lengths(rows, name: str)");
    return nullptr;
  }
  ensure_numpy_checked();
  PyObject* seq = PySequence_Fast(args[0], "psm_row_lengths: expected a sequence of rows");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t B = PySequence_Fast_GET_SIZE(seq);
  PyObject* out = PyBytes_FromStringAndSize(nullptr, B * static_cast<Py_ssize_t>(sizeof(int64_t)));
  auto* f = new Field;  // owned by the capsule below, or deleted
  f->name = PyUnicode_AsUTF8(args[1]);
  f->rows.resize(static_cast<size_t>(B));
  f->views.reserve(static_cast<size_t>(B));
  auto fail_out = [&]() -> PyObject* {
    Py_DECREF(seq);
    Py_XDECREF(out);
    delete f;
    return nullptr;
  };
  if (out == nullptr) return fail_out();
  auto* lens = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out));
  bool other = false;
  for (Py_ssize_t b = 0; b < B; ++b) {
    PyObject* row = PySequence_Fast_GET_ITEM(seq, b);
    if (!PyList_Check(row) && !PyTuple_Check(row) && !PyObject_CheckBuffer(row) && !PyUnicode_Check(row) &&
        !PyDict_Check(row)) {
      const Py_ssize_t n = PyObject_Length(row);
      if (n >= 0) {
        lens[b] = n;
        other = true;
        continue;
      }
      PyErr_Clear();
    }
    if (!open_source(row, *f, b, &f->rows[static_cast<size_t>(b)])) return fail_out();
    lens[b] = f->rows[static_cast<size_t>(b)].len;
  }
  Py_DECREF(seq);
  int64_t longest = 0, shortest = 0;
  if (B > 0) {
    longest = shortest = lens[0];
    for (Py_ssize_t b = 1; b < B; ++b) {
      longest = std::max(longest, lens[b]);
      shortest = std::min(shortest, lens[b]);
    }
  }
  PyObject* opened = Py_None;
  if (other) {
    delete f;
    Py_INCREF(Py_None);
  } else {
    opened = PyCapsule_New(f, kOpenedRows, [](PyObject* c) {
      delete static_cast<Field*>(PyCapsule_GetPointer(c, kOpenedRows));
    });
    if (opened == nullptr) {
      delete f;
      Py_DECREF(out);
      return nullptr;
    }
  }
  return Py_BuildValue("(NOLLN)", out, other ? Py_True : Py_False, static_cast<long long>(longest),
                       static_cast<long long>(shortest), opened);
}

// psm_fill(B, L, Ll, max_length, trunc_left, pad_left, tokens, tok_offsets, labels_kind, labels, lab_offsets,
//          prompt_lengths, loss_masks, mask_offsets, extras, outs, extra_outs, pad_token_id, label_pad_token_id,
//          decoder_start_token_id, out_itemsize, num_threads, max_threads)
//
//   L, Ll, max_length, trunc_left, pad_left    psm::Layout (max_length < 0: no truncation)
//   tokens         sequence of B rows (or the capsule psm_row_lengths returned for them), or one flat 1-D buffer
//                  (then tok_offsets = its int64 [B + 1] offsets, else None)
//   labels_kind    0 none, 1 derived from tokens, 2 given in `labels` (rows, or flat with lab_offsets)
//   prompt_lengths None, or int64 [B]
//   loss_masks     None, or 0/1 values with the tokens' lengths, as rows or flat with mask_offsets (each field
//                  has its own form: CPU tensor rows arrive concatenated, beside list rows)
//   extras         tuple of (name, values with the tokens' lengths, their offsets or None, pad value)
//   outs           tuple of kNumOut addresses (0 = not requested), in slot order (psm::kOutputNames);
//                  [B, L] or [B, Ll] (psm::label_width), C-contiguous
//   extra_outs     tuple of addresses, one [B, L] output per extra
//   out_itemsize   4 (int32 outputs) or 8 (int64)
//   num_threads    > 0: that many threads; 0: automatic (by size), at most max_threads. Threads are only
//                  used when no row is a Python sequence
// The widths must come from the lengths of these very objects (Python measures them first); offsets are
// trusted (Python checked them).
PyObject* psm_fill(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  enum Arg {
    kB, kL, kLl, kMaxLength, kTruncLeft, kPadLeft, kTokens, kTokOffsets, kLabelsKind, kLabels, kLabOffsets,
    kPrompt, kMasks, kMaskOffsets, kExtras, kOuts, kExtraOuts, kPad, kLabelPad, kDecoderStart, kItemsize,
    kThreads, kMaxThreads, kNumArgs
  };
  if (nargs != kNumArgs) {
    PyErr_Format(PyExc_TypeError, "pyseqpack._C.psm_fill takes %d positional arguments", static_cast<int>(kNumArgs));
    return nullptr;
  }
  ensure_numpy_checked();
  Problem p;
  bool ok = true;
  int64_t B, trunc_left, pad_left, itemsize, kind, requested_threads, max_threads;
  if (!as_i64(args[kB], "B", &B) || !as_i64(args[kL], "L", &p.layout.L) || !as_i64(args[kLl], "Ll", &p.layout.Ll) ||
      !as_i64(args[kMaxLength], "max_length", &p.layout.max_length) ||
      !as_i64(args[kTruncLeft], "trunc_left", &trunc_left) || !as_i64(args[kPadLeft], "pad_left", &pad_left) ||
      !as_i64(args[kLabelsKind], "labels_kind", &kind) || !as_i64(args[kPad], "pad_token_id", &p.pad) ||
      !as_i64(args[kLabelPad], "label_pad_token_id", &p.label_pad) ||
      !as_i64(args[kDecoderStart], "decoder_start_token_id", &p.decoder_start) ||
      !as_i64(args[kItemsize], "out_itemsize", &itemsize) ||
      !as_i64(args[kThreads], "num_threads", &requested_threads) ||
      !as_i64(args[kMaxThreads], "max_threads", &max_threads))
    return nullptr;
  if (itemsize != 4 && itemsize != 8) {
    PyErr_SetString(PyExc_ValueError, "pyseqpack._C.psm_fill: out_itemsize must be 4 or 8");
    return nullptr;
  }
  p.layout.trunc_left = trunc_left != 0;
  p.layout.pad_left = pad_left != 0;
  p.kind = static_cast<int32_t>(kind);
  p.itemsize = itemsize;

  Int64View tok_offsets, lab_offsets, mask_offsets, prompt;
  if (!tok_offsets.open(args[kTokOffsets], "tok_offsets", B + 1, true) ||
      !lab_offsets.open(args[kLabOffsets], "lab_offsets", B + 1, true) ||
      !mask_offsets.open(args[kMaskOffsets], "mask_offsets", B + 1, true) ||
      !prompt.open(args[kPrompt], "prompt_lengths", B, true))
    return nullptr;
  p.prompt = prompt.data;
  if (!(p.tok = use_field(args[kTokens], "input_ids", tok_offsets.data, B, p.tok_own))) return nullptr;
  set_range(*p.tok, itemsize, false);
  if (p.kind == psm::kGivenLabels) {
    if (!(p.lab = use_field(args[kLabels], "labels", lab_offsets.data, B, p.lab_own))) return nullptr;
    set_range(*p.lab, itemsize, false);
  }
  if (args[kMasks] != Py_None) {
    p.has_mask = true;
    if (!(p.mask = use_field(args[kMasks], "loss_masks", mask_offsets.data, B, p.mask_own))) return nullptr;
    set_range(*p.mask, itemsize, true);
  }
  PyObject *extras = args[kExtras], *outs = args[kOuts], *extra_outs = args[kExtraOuts];
  if (!PyTuple_Check(extras) || !PyTuple_Check(outs) || !PyTuple_Check(extra_outs) ||
      PyTuple_GET_SIZE(outs) != kNumOut || PyTuple_GET_SIZE(extra_outs) != PyTuple_GET_SIZE(extras)) {
    PyErr_SetString(PyExc_TypeError, "pyseqpack._C.psm_fill: extras, outs, extra_outs must be tuples (outs: one per output slot)");
    return nullptr;
  }
  const Py_ssize_t E = PyTuple_GET_SIZE(extras);
  p.extras_own = std::vector<Field>(static_cast<size_t>(E));
  p.extras.resize(static_cast<size_t>(E));
  p.extra_pads.resize(static_cast<size_t>(E));
  p.extra_out.resize(static_cast<size_t>(E));
  std::vector<Int64View> extra_offsets(static_cast<size_t>(E));  // sized once: views are never copied
  for (Py_ssize_t e = 0; e < E; ++e) {
    PyObject* item = PyTuple_GET_ITEM(extras, e);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
      PyErr_SetString(PyExc_TypeError, "pyseqpack._C.psm_fill: each extra must be (name, values, offsets, pad)");
      return nullptr;
    }
    const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
    if (!extra_offsets[e].open(PyTuple_GET_ITEM(item, 2), "extra offsets", B + 1, true) ||
        !as_i64(PyTuple_GET_ITEM(item, 3), "extra pad", &p.extra_pads[e]) ||
        !(p.extras[e] = use_field(PyTuple_GET_ITEM(item, 1), name, extra_offsets[e].data, B, p.extras_own[e])))
      return nullptr;
    set_range(*p.extras[e], itemsize, false);
    p.extra_out[e] = as_ptr<void>(PyTuple_GET_ITEM(extra_outs, e), "extra_outs", &ok);
  }
  for (int i = 0; i < kNumOut; ++i) p.out[i] = as_ptr<void>(PyTuple_GET_ITEM(outs, i), "outs", &ok);
  if (!ok) return nullptr;

  int n_out = 0;
  for (void* o : p.out) n_out += o != nullptr;
  n_out += static_cast<int>(E);
  const int64_t work = B * std::max(p.layout.L, p.layout.Ll) * n_out;
  const int64_t threads = p.needs_gil() ? 1 : choose_threads(requested_threads, max_threads, B, work);

  auto run = [&](int64_t b0, int64_t b1, Failure* fl) { p.rows(b0, b1, fl); };
  Failure first;
  if (p.needs_gil()) {
    run(0, B, &first);
  } else {
    std::vector<Failure> failures(static_cast<size_t>(threads));
    Py_BEGIN_ALLOW_THREADS;
    if (threads == 1) {
      run(0, B, &failures[0]);
    } else {
      std::vector<std::thread> pool;
      for (int64_t t = 0; t < threads; ++t)
        pool.emplace_back(run, B * t / threads, B * (t + 1) / threads, &failures[t]);
      for (auto& th : pool) th.join();
    }
    Py_END_ALLOW_THREADS;
    for (auto& f : failures)
      if (f.fault != Fault::kNone && f.row < first.row) first = f;
  }
  if (first.fault != Fault::kNone) {
    raise_failure(first);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// psm_gather(values, name, B, offsets, max_length, trunc_left, out, out_itemsize, is_mask)
//
// Packs every example's KEPT values (after truncation to max_length, < 0 for none, on the left when
// trunc_left) back to back into `out` (int32 or int64, the sum of kept counts), reading and validating them
// exactly like fill. `values`: B rows, or a flat buffer with its int64 [B + 1] offsets (else None). The device
// backends use it to turn host rows into one flat buffer for a single copy.
PyObject* psm_gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9 || !PyUnicode_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "pyseqpack._C.psm_gather takes 9 positional arguments");
    return nullptr;
  }
  ensure_numpy_checked();
  bool ok = true;
  int64_t B, trunc_left, itemsize, is_mask;
  psm::Layout lay{};
  void* out = as_ptr<void>(args[6], "out", &ok);
  if (!ok || !as_i64(args[2], "B", &B) || !as_i64(args[4], "max_length", &lay.max_length) ||
      !as_i64(args[5], "trunc_left", &trunc_left) || !as_i64(args[7], "out_itemsize", &itemsize) ||
      !as_i64(args[8], "is_mask", &is_mask))
    return nullptr;
  lay.trunc_left = trunc_left != 0;
  Int64View bases_view;
  if (!bases_view.open(args[3], "offsets", B + 1, true)) return nullptr;
  Field own;
  Field* opened = use_field(args[0], PyUnicode_AsUTF8(args[1]), bases_view.data, B, own);
  if (opened == nullptr) return nullptr;
  Field& f = *opened;
  set_range(f, itemsize, is_mask != 0);
  std::vector<int64_t> scratch;
  Failure fl;
  int64_t pos = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t start, end, src, col;
    bounds(f, b, &start, &end);
    const int64_t n = psm::span(start, end);
    const int64_t kept = psm::kept_count(n, lay.max_length);
    psm::place(start, n, kept, 0, lay, &src, &col);
    const int64_t* v = nullptr;
    if (!stage(f, b, src - start, kept, scratch, &v, &fl)) {
      raise_failure(fl);
      return nullptr;
    }
    if (itemsize == 8) {
      if (kept > 0) std::memcpy(static_cast<int64_t*>(out) + pos, v, static_cast<size_t>(kept) * sizeof(int64_t));
    } else {
      int32_t* o = static_cast<int32_t*>(out) + pos;
      for (int64_t k = 0; k < kept; ++k) o[k] = static_cast<int32_t>(v[k]);
    }
    pos += kept;
  }
  Py_RETURN_NONE;
}
