;; Hostile: parks inside a host call. poll_oneoff sleeps for an hour on a relative monotonic
;; clock, and if it ever returns, sleeps again. No guest code runs while it waits, so the epoch
;; cannot interrupt it: only the host-side timer can.
;; Expected: 504 timeout at the function's timeout_ms; the host thread is not blocked meanwhile.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription at 64 (48 bytes): userdata u64, tag u8 = 0 (clock), clock id u32 at +16 = 1
    ;; (monotonic), timeout u64 at +24 in ns, precision at +32, flags u16 at +40 = 0 (relative)
    (i64.store (i32.const 64) (i64.const 1))
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const 3600000000000))
    (i64.store (i32.const 96) (i64.const 0))
    (i32.store16 (i32.const 104) (i32.const 0))
    (loop $again
      (drop (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8)))
      (br $again))))
