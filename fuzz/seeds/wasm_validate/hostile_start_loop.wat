;; Hostile: spins in the module's start function, which runs while the instance is being created,
;; before `_start` is ever called.
;; Expected: 504 timeout at the function's timeout_ms: the deadline covers instantiation too.
(module
  (memory (export "memory") 1)
  (func $init (loop $forever (br $forever)))
  (start $init)
  (func (export "_start")))
