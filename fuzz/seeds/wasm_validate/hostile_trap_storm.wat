;; Hostile: traps as fast as it can be invoked. Logs a line on stderr, then loads from the last
;; bytes of the 4 GiB address space, far outside its one page of memory.
;; Expected: 502 function_failed with trap "out of bounds memory access" and the stderr line, every
;; time; invoked ~300 times from 8 threads, every answer is that 502 and the server stays healthy.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "storm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (i64.load (i32.const -8)))))
