;; Hostile: floods stderr (the invocation's log). Writes a 100-byte line to fd 2 forever,
;; ignoring every error code.
;; Expected: 502 function_failed once stderr passes its 64 KiB cap, message "stderr exceeded its
;; limit"; the error body carries only a bounded tail of it.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (memory.fill (i32.const 1024) (i32.const 0x45) (i32.const 99))
    (i32.store8 (i32.const 1123) (i32.const 10))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 100))
    (loop $forever
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $forever))))
