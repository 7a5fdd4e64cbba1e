;; The smallest Kiln function: a WASI preview 1 command that prints a greeting.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello from Kiln!\n")
  (func (export "_start")
    ;; one iovec at 0: { buf = 16, len = 17 }; bytes written go to 8
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
