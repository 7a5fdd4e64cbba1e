;; Hostile: a busy loop that lives in host calls. Calls clock_time_get on the monotonic clock
;; forever, checking only that it never goes backwards, so most of its time is spent in the host.
;; Expected: 504 timeout at the function's timeout_ms (the epoch still interrupts the guest code
;; between calls), and the server keeps answering meanwhile.
(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $last i64)
    (loop $spin
      (if (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 16)) (then unreachable))
      (if (i64.lt_u (i64.load (i32.const 16)) (local.get $last)) (then unreachable))
      (local.set $last (i64.load (i32.const 16)))
      (br $spin))))
