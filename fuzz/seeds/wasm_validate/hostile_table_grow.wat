;; Hostile: a table.grow bomb. Grows a funcref table by 10,000 elements at a time (each filled
;; with a real function reference) until table.grow answers -1, then asks for 2^32-1 more at once,
;; then prints the final size and how the huge request went, and exits 0.
;; Expected: 200, output "size=100000 huge=-1": the pool caps tables at 100,000 elements and a
;; refused growth is an ordinary -1, not a trap and not host memory.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table $t 0 funcref)
  (elem declare func $start)
  (data (i32.const 300) "size=")
  (data (i32.const 310) " huge=")
  (data (i32.const 320) "-1\n")
  (data (i32.const 330) "ok\n")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  ;; unsigned decimal of $n, built backwards ending at 240
  (func $print_num (param $n i32)
    (local $p i32)
    (local.set $p (i32.const 240))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (call $write (local.get $p) (i32.sub (i32.const 240) (local.get $p))))
  (func $start (export "_start")
    (block $refused
      (loop $grow
        (br_if $refused
          (i32.eq (table.grow $t (ref.func $start) (i32.const 10000)) (i32.const -1)))
        (br $grow)))
    (call $write (i32.const 300) (i32.const 5))
    (call $print_num (table.size $t))
    (call $write (i32.const 310) (i32.const 6))
    (if (i32.eq (table.grow $t (ref.null func) (i32.const -1)) (i32.const -1))
      (then (call $write (i32.const 320) (i32.const 3)))
      (else (call $write (i32.const 330) (i32.const 3))))))
