;; Hostile: floods stdout. Writes a 64 KiB buffer to fd 1 forever, ignoring every error code.
;; Expected: 502 function_failed once stdout passes its 6 MiB cap, message "stdout exceeded its
;; limit"; the host never buffers more than the cap.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (memory.fill (i32.const 65536) (i32.const 0x41) (i32.const 65536))
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $forever
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $forever))))
