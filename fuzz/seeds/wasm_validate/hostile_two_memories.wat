;; Hostile: a component with two core modules, each with its own 32-bit memory, each growing to
;; 100 MiB — together 200 MiB under "memory_mb": 128. Expected: 502, "memory limit of 128 MiB
;; exceeded" (the limit covers all of an instance's memories together).
(component
  (core module $left
    (memory 1)
    (func (export "grow") (result i32)
      (memory.grow (i32.const 1600))))
  (core module $main
    (import "left" "grow" (func $grow (result i32)))
    (memory 1)
    (func (export "run") (result i32)
      (if (i32.eq (call $grow) (i32.const -1)) (then (return (i32.const 1))))
      (if (i32.eq (memory.grow (i32.const 1600)) (i32.const -1)) (then (return (i32.const 1))))
      (i32.const 0)))
  (core instance $left (instantiate $left))
  (core instance $main (instantiate $main (with "left" (instance $left))))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $cli (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $cli)))
