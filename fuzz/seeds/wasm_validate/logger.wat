;; Writes a log line to stderr, then copies stdin to stdout (one read, up to 64 KiB): a function
;; whose invocation has both a result and a log.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "logger: handling a request\n")
  (func (export "_start")
    ;; stderr: iovec at 0 = {64, 27}
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 27))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; stdin -> stdout through the buffer at 1024
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 65536))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
