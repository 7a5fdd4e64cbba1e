;; Hostile: unbounded recursion, each frame keeping four i64 locals live across the call, to run the Wasm
;; stack into its guard.
;; Expected: 502 function_failed, message "the function trapped: stack overflow"; the host's own
;; stack is untouched and the next invocation runs normally.
(module
  (memory (export "memory") 1)
  (func $deep (param $n i64) (result i64)
    (local $a i64) (local $b i64) (local $c i64) (local $d i64)
    (local.set $a (i64.add (local.get $n) (i64.const 1)))
    (local.set $b (i64.mul (local.get $a) (i64.const 3)))
    (local.set $c (i64.xor (local.get $b) (local.get $n)))
    (local.set $d (call $deep (local.get $c)))
    ;; keep the locals live across the call so every frame holds them
    (i64.add (local.get $d) (i64.add (local.get $a) (i64.add (local.get $b) (local.get $c)))))
  (func (export "_start")
    (drop (call $deep (i64.const 0)))))
