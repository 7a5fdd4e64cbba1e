;; Hostile (with its config): holds its instance for 300 ms (poll_oneoff sleep), then prints
;; "done". Deployed with max_concurrency 2 and fired 10 times at once, it tries to exceed the
;; function's concurrency limit.
;; Expected: every answer is 200 "done" or 429 too_many_requests, at least one of each, and at
;; most 2 running at once.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "done")
  (func (export "_start")
    (i64.store (i32.const 64) (i64.const 1))
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const 300000000))
    (i64.store (i32.const 96) (i64.const 0))
    (i32.store16 (i32.const 104) (i32.const 0))
    (if (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8)) (then unreachable))
    (i32.store (i32.const 0) (i32.const 900))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
