;; Hostile: spins forever in guest code. Expected: 504 timeout at the function's timeout_ms, and
;; the server keeps serving other requests meanwhile (guest code yields every 10 ms slice).
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever (br $forever))))
