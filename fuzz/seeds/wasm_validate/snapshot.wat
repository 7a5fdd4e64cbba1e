;; A pre-initialised function. Its init hook runs once, at deploy, and invocations start from
;; the snapshot it leaves: they share the seed drawn at init, and draw fresh bytes of their own.
(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0..8: the seed; 8..16: fresh bytes; 32: iovec; 40: bytes written; 64..100: the output line
  (global $init_runs (mut i32) (i32.const 0))
  (global $work (mut i64) (i64.const 0))

  ;; The expensive start-up: ~0.3 s of arithmetic, then an 8-byte seed from random_get.
  (func (export "wizer.initialize")
    (local $i i64) (local $acc i64)
    (loop $spin
      (local.set $acc (i64.add (i64.mul (local.get $acc) (i64.const 6364136223846793005))
                               (i64.const 1442695040888963407)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $spin (i64.lt_u (local.get $i) (i64.const 150000000))))
    (global.set $work (local.get $acc))
    (drop (call $random_get (i32.const 0) (i32.const 8)))
    (global.set $init_runs (i32.add (global.get $init_runs) (i32.const 1))))

  (func $hex_digit (param $x i32) (result i32)
    (select (i32.add (local.get $x) (i32.const 48)) (i32.add (local.get $x) (i32.const 87))
            (i32.lt_u (local.get $x) (i32.const 10))))

  ;; Writes the n bytes at src as 2n hex characters at dst.
  (func $hex (param $src i32) (param $n i32) (param $dst i32)
    (local $i i32) (local $b i32)
    (loop $each
      (local.set $b (i32.load8_u (i32.add (local.get $src) (local.get $i))))
      (i32.store8 (i32.add (local.get $dst) (i32.shl (local.get $i) (i32.const 1)))
                  (call $hex_digit (i32.shr_u (local.get $b) (i32.const 4))))
      (i32.store8 (i32.add (i32.add (local.get $dst) (i32.shl (local.get $i) (i32.const 1))) (i32.const 1))
                  (call $hex_digit (i32.and (local.get $b) (i32.const 15))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $each (i32.lt_u (local.get $i) (local.get $n)))))

  ;; Prints "<seed hex> <fresh hex> <init runs>\n", drawing the fresh bytes now.
  (func (export "_start")
    (drop (call $random_get (i32.const 8) (i32.const 8)))
    (call $hex (i32.const 0) (i32.const 8) (i32.const 64))
    (i32.store8 (i32.const 80) (i32.const 32))
    (call $hex (i32.const 8) (i32.const 8) (i32.const 81))
    (i32.store8 (i32.const 97) (i32.const 32))
    (i32.store8 (i32.const 98) (i32.add (i32.const 48) (global.get $init_runs)))
    (i32.store8 (i32.const 99) (i32.const 10))
    (i32.store (i32.const 32) (i32.const 64))
    (i32.store (i32.const 36) (i32.const 36))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40)))))
