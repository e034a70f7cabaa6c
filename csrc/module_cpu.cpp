// pyseqpack._C: the CPython extension holding the C++ CPU kernels.
// No torch headers: Python passes raw data pointers (ints), sizes and strides, or plain Python
// objects (lists / buffers) that are read here with the CPython API, with no per-element Python.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <thread>

static PyObject* hardware_threads(PyObject*, PyObject*) {
  return PyLong_FromLong(static_cast<long>(std::thread::hardware_concurrency()));
}

static PyMethodDef kMethods[] = {
    {"hardware_threads", hardware_threads, METH_NOARGS, "std::thread::hardware_concurrency()"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "pyseqpack C++ CPU kernels", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
