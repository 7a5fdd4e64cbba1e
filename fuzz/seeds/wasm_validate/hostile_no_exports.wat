;; Hostile: a module that exports nothing callable. It has code that would run, but its only
;; export named "_start" is a global, not a function (and its function is exported as "start").
;; Expected: refused at deploy, 422 invalid_code, message mentions `_start`.
(module
  (memory 1)
  (global (export "_start") i32 (i32.const 0))
  (func (export "start") (loop $forever (br $forever))))
