// pyseqpack._C: the CPython extension holding the C++ CPU kernels.
// No torch headers: Python passes raw data pointers (ints), sizes and strides, or plain Python
// objects (lists / buffers) that are read here with the CPython API, with no per-element Python.
// Each op's entry points live in its own csrc/<op>_cpu.cpp and are listed in kMethods below.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

// csrc/pad_shift_mask_cpu.cpp
PyObject* psm_row_lengths(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* psm_fill(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* psm_gather(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* numpy_rows_fast(PyObject*, PyObject*);

#define PSM_FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f)), METH_FASTCALL

static PyMethodDef kMethods[] = {
    {"psm_row_lengths", PSM_FASTCALL(psm_row_lengths),
     "psm_row_lengths(rows, name) -> (row lengths, other, longest, shortest, opened rows) (pad_shift_mask)"},
    {"psm_fill", PSM_FASTCALL(psm_fill), "psm_fill(...): pad_shift_mask's one-pass CPU kernel (see its source)"},
    {"psm_gather", PSM_FASTCALL(psm_gather), "psm_gather(...): packs kept values of host rows into one buffer"},
    {"numpy_rows_fast", numpy_rows_fast, METH_NOARGS,
     "numpy_rows_fast() -> bool: numpy rows are read from numpy's fields (layout checked), not the buffer protocol"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "pyseqpack C++ CPU kernels", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
