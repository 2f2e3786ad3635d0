// Makes the compiled library importable as `reft_ext._C`: importing it loads the shared object,
// whose static initializers register the ops with the dispatcher. No Python functions are bound.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
