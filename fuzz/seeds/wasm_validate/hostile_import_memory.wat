;; Hostile: imports its linear memory from `wasi_snapshot_preview1`, hoping the host hands over
;; memory it shares with something else.
;; Expected: refused at deploy, 422 invalid_code, message says it imports a non-function.
(module
  (import "wasi_snapshot_preview1" "memory" (memory 1))
  (func (export "_start")))
