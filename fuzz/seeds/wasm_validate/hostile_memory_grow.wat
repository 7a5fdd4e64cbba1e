;; Hostile: a memory.grow bomb. Grows linear memory by 16 pages (1 MiB) at a time, forever, and
;; touches every new MiB so the pages are really committed. It never checks for -1 politely: if
;; memory.grow ever fails instead of trapping, it hits `unreachable`.
;; Expected: 502 function_failed, message names the "memory limit" (the limiter traps the growth
;; past the function's memory_mb); the host's memory is unaffected once the invocation ends.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $old i32)
    (loop $grow
      (local.set $old (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old) (i32.const -1)) (then unreachable))
      ;; write one byte in each 4 KiB page of the new MiB
      (memory.fill (i32.mul (local.get $old) (i32.const 65536)) (i32.const 0xAA) (i32.const 1048576))
      (br $grow))))
