// Python entry points for the CPU kernels' C functions, called with METH_FASTCALL: a ctypes call
// converts each argument through its argtypes and costs ~4 us for 25 arguments on the 2-core boxes,
// about what the near-free model's whole rotary takes; this one ~0.3 us. kernels/cpu_build.py
// compiles them in (-DTANDEM_PYFAST) where Python's headers are installed and loads the library as an
// extension module too; elsewhere the same C functions are called through ctypes.
//
// Each entry point takes the C function's arguments positionally, in its order: Python ints for
// pointers (data_ptr(); None is a null pointer), sizes, strides and codes, Python floats (or ints)
// for float parameters. It returns the function's int; a wrong count or type raises TypeError. The
// GIL is released while the kernel runs, as ctypes does.
//
//     TANDEM_FASTCALL(rms_norm)          py_rms_norm, calling tandem_rms_norm
//     TANDEM_FASTCALL_MODULE(layer_ops_cpu, TANDEM_METHOD(rms_norm), ...)
//                                        PyInit_tandem_layer_ops_cpu: the module's function table
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace pyfast {

union Slot {
  int64_t i;
  double f;
};

template <class T>
T as(const Slot& s) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(static_cast<intptr_t>(s.i));
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(s.f);
  } else {
    return static_cast<T>(s.i);
  }
}

template <class... A, size_t... I>
int invoke(int (*fn)(A...), const Slot* v, std::index_sequence<I...>) {
  return fn(as<A>(v[I])...);
}

template <class... A>
PyObject* fastcall(const char* name, int (*fn)(A...), PyObject* const* args, Py_ssize_t n) {
  constexpr Py_ssize_t N = sizeof...(A);
  constexpr bool is_float[] = {std::is_floating_point_v<A>...};
  constexpr bool is_pointer[] = {std::is_pointer_v<A>...};
  if (n != N) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, N, n);
    return nullptr;
  }
  Slot v[N];
  for (Py_ssize_t i = 0; i < N; ++i) {
    if (is_float[i]) {
      v[i].f = PyFloat_AsDouble(args[i]);
      if (v[i].f == -1.0 && PyErr_Occurred()) return nullptr;
    } else if (is_pointer[i] && args[i] == Py_None) {
      v[i].i = 0;
    } else {
      v[i].i = PyLong_AsLongLong(args[i]);
      if (v[i].i == -1 && PyErr_Occurred()) return nullptr;
    }
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = invoke(fn, v, std::index_sequence_for<A...>{});
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

}  // namespace pyfast

#define TANDEM_FASTCALL(name)                                                      \
  static PyObject* py_##name(PyObject*, PyObject* const* args, Py_ssize_t n) {     \
    return pyfast::fastcall(#name, tandem_##name, args, n);                        \
  }

#define TANDEM_METHOD(name) \
  { #name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_##name)), METH_FASTCALL, nullptr }

#define TANDEM_FASTCALL_MODULE(module, ...)                                                        \
  static PyMethodDef tandem_methods_[] = {__VA_ARGS__, {nullptr, nullptr, 0, nullptr}};           \
  static PyModuleDef tandem_module_ = {PyModuleDef_HEAD_INIT, "tandem_" #module, nullptr, -1,      \
                                       tandem_methods_, nullptr, nullptr, nullptr, nullptr};      \
  extern "C" PyMODINIT_FUNC PyInit_tandem_##module(void) { return PyModule_Create(&tandem_module_); }
