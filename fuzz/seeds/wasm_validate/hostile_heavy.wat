;; Hostile (issue 16): a component that takes eight memories of the instance pool per instance (seven
;; small modules' and its own) and spins until its timeout. The pool holds `--max-instances`
;; memories: such instances used to exhaust it, and *other* functions then failed to instantiate
;; (502, blamed on them). Expected now: each instance holds eight of the pool's permits, so past
;; them the caller gets 429 — the heavy function's caller and others alike — and never a 502.
(component
  (core module $m0 (memory 1))
  (core instance (instantiate $m0))
  (core module $m1 (memory 1))
  (core instance (instantiate $m1))
  (core module $m2 (memory 1))
  (core instance (instantiate $m2))
  (core module $m3 (memory 1))
  (core instance (instantiate $m3))
  (core module $m4 (memory 1))
  (core instance (instantiate $m4))
  (core module $m5 (memory 1))
  (core instance (instantiate $m5))
  (core module $m6 (memory 1))
  (core instance (instantiate $m6))
  (core module $main
    (memory 1)
    (func (export "run") (result i32)
      (loop (br 0))
      (i32.const 0)))
  (core instance $main (instantiate $main))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $cli (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $cli)))
