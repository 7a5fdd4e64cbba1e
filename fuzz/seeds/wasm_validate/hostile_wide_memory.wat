;; Hostile (issue 16, defect 2): a component whose second core module has a 64-bit memory. Asking
;; that memory to grow by 2^48 pages made Kiln's memory limiter's count wrap, after which the
;; 32-bit memory grew to 250 MiB under "memory_mb": 128 and the invocation answered 200.
;; Expected now: refused at deploy (422), the 64-bit memory proposal being off; and were it
;; allowed, the limiter would count the request without wrapping (its unit tests).
(component
  (core module $wide
    (memory i64 1)
    (func (export "grow") (result i64)
      (memory.grow (i64.const 0x1000000000000))))
  (core module $main
    (import "wide" "grow" (func $grow (result i64)))
    (memory 1)
    (func (export "run") (result i32)
      (drop (call $grow))
      (drop (call $grow))
      ;; 4000 pages: 250 MiB.
      (if (i32.eq (memory.grow (i32.const 4000)) (i32.const -1))
        (then (return (i32.const 1))))
      (i32.store (i32.const 262000000) (i32.const 7))
      (i32.const 0)))
  (core instance $wide (instantiate $wide))
  (core instance $main (instantiate $main (with "wide" (instance $wide))))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $cli (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $cli)))
