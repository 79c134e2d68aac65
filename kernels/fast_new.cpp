// A fast positional constructor for a slots dataclass (kernels/fast_new.py builds and loads it; its
// reference is the class itself, called with every field positionally). The engine makes a
// RequestOutput for every decoding sequence every step; the dataclass's __init__ (15 fields) costs
// ~0.25 us a call on the 2-core boxes, this ~0.1 us: it allocates the instance and stores each
// argument in its slot, and nothing else. So it serves only classes whose __init__ does nothing else
// (the loader checks: slots exactly the fields, no __post_init__), and only as a Python extension
// module (-DTANDEM_PYFAST, where Python's headers are installed); elsewhere the loader hands back the
// class itself.

#ifdef TANDEM_PYFAST
#include "pyfast.h"

#include <structmember.h>

namespace {

constexpr const char* CAPSULE = "tandem.fast_new";
constexpr Py_ssize_t MAX_FIELDS = 64;

struct Layout {
  PyTypeObject* type;              // a strong reference, dropped with the capsule
  Py_ssize_t n;                    // fields
  Py_ssize_t offset[MAX_FIELDS];   // field i's slot: its byte offset in an instance
};

void free_layout(PyObject* capsule) {
  auto* layout = static_cast<Layout*>(PyCapsule_GetPointer(capsule, CAPSULE));
  if (layout != nullptr) {
    Py_DECREF(layout->type);
    PyMem_Free(layout);
  }
}

// The constructor itself: `self` is the capsule holding the class's Layout.
PyObject* construct(PyObject* self, PyObject* const* args, Py_ssize_t n) {
  auto* layout = static_cast<Layout*>(PyCapsule_GetPointer(self, CAPSULE));
  if (layout == nullptr) return nullptr;
  if (n != layout->n) {
    PyErr_Format(PyExc_TypeError, "%s's fast constructor takes %zd positional arguments, got %zd",
                 layout->type->tp_name, layout->n, n);
    return nullptr;
  }
  PyObject* obj = layout->type->tp_alloc(layout->type, 0);  // slots zeroed (NULL), tracked by the GC
  if (obj == nullptr) return nullptr;
  char* base = reinterpret_cast<char*>(obj);
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_INCREF(args[i]);
    *reinterpret_cast<PyObject**>(base + layout->offset[i]) = args[i];
  }
  return obj;
}

PyMethodDef construct_def = {"fast_new", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(construct)),
                             METH_FASTCALL, "the class's fields positionally -> an instance (kernels/fast_new.py)"};

// constructor(cls, fields): `cls`'s fast constructor; `fields` (a tuple of str) names its slots in
// argument order. TypeError where a field is not a plain object slot of `cls` itself.
PyObject* py_constructor(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n != 2 || !PyType_Check(args[0]) || !PyTuple_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "constructor(cls, fields): a class and a tuple of field names");
    return nullptr;
  }
  auto* type = reinterpret_cast<PyTypeObject*>(args[0]);
  const Py_ssize_t nf = PyTuple_GET_SIZE(args[1]);
  if (nf > MAX_FIELDS || type->tp_dictoffset != 0) {
    PyErr_Format(PyExc_TypeError, "%s: more than %zd fields, or instances with a __dict__", type->tp_name, MAX_FIELDS);
    return nullptr;
  }
  auto* layout = static_cast<Layout*>(PyMem_Malloc(sizeof(Layout)));
  if (layout == nullptr) return PyErr_NoMemory();
  layout->n = nf;
  for (Py_ssize_t i = 0; i < nf; ++i) {
    PyObject* name = PyTuple_GET_ITEM(args[1], i);
    PyObject* descr = PyUnicode_Check(name) ? PyDict_GetItemWithError(type->tp_dict, name) : nullptr;  // borrowed
    if (descr == nullptr || Py_TYPE(descr) != &PyMemberDescr_Type ||
        reinterpret_cast<PyMemberDescrObject*>(descr)->d_member->type != T_OBJECT_EX ||
        (reinterpret_cast<PyMemberDescrObject*>(descr)->d_member->flags & READONLY)) {
      PyMem_Free(layout);
      if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "%s.%R is not a writable slot of the class itself", type->tp_name, name);
      return nullptr;
    }
    layout->offset[i] = reinterpret_cast<PyMemberDescrObject*>(descr)->d_member->offset;
  }
  Py_INCREF(type);
  layout->type = type;
  PyObject* capsule = PyCapsule_New(layout, CAPSULE, free_layout);
  if (capsule == nullptr) {
    Py_DECREF(type);
    PyMem_Free(layout);
    return nullptr;
  }
  PyObject* fn = PyCFunction_New(&construct_def, capsule);
  Py_DECREF(capsule);
  return fn;
}

}  // namespace

TANDEM_FASTCALL_MODULE(fast_new, TANDEM_METHOD(constructor))
#endif
