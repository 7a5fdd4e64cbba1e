;; Hostile: one enormous write. Grows memory to 17 MiB, fills it, then hands fd_write a single
;; iovec of 16 MiB for stdout, more than twice the cap, in one host call.
;; Expected: 502 function_failed, message "stdout exceeded its limit"; the host does not copy or
;; keep the 16 MiB.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (if (i32.eq (memory.grow (i32.const 271)) (i32.const -1)) (then unreachable))
    (memory.fill (i32.const 65536) (i32.const 0x5A) (i32.const 16777216))
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 16777216))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; only reached if the write "succeeded": say so loudly
    unreachable))
