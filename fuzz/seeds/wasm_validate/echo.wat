;; Copies stdin (the request body) to stdout (the response body).
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; iovec at 0 {buf, len}; result count at 8; buffer from 1024 to the end of page 2
  (func $write_all (param $ptr i32) (param $len i32)
    (loop $more
      (i32.store (i32.const 0) (local.get $ptr))
      (i32.store (i32.const 4) (local.get $len))
      (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)) (then unreachable))
      (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
      (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
      (br_if $more (i32.gt_s (local.get $len) (i32.const 0)))))
  (func (export "_start")
    (local $n i32)
    (loop $again
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 130048))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)) (then unreachable))
      (local.set $n (i32.load (i32.const 8)))
      (if (i32.eqz (local.get $n)) (then return))
      (call $write_all (i32.const 1024) (local.get $n))
      (br $again))))
