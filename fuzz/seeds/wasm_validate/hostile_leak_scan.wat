;; Hostile: the other half of the cross-invocation leak test, as a *different* module (other code,
;; other data segments, other memory image) that lands in pool slots the `leak` writer used.
;; stdin is the 16 bytes to look for. It keeps them in locals only, zeroes its input buffer,
;; grows memory to 4 MiB like the writer did, and counts every byte offset where the 16 bytes
;; appear and every non-zero 8-byte word in [64 KiB, 4 MiB); it also reports its mutable global.
;; Expected: 200 "matches=0 nonzero=0 global=7".
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $g (mut i64) (i64.const 7))
  (data (i32.const 4096) "a different module with a different memory image")
  (data (i32.const 300) "matches=")
  (data (i32.const 310) " nonzero=")
  (data (i32.const 320) " global=")
  (data (i32.const 330) "\n")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $print_num (param $n i32)
    (local $p i32)
    (local.set $p (i32.const 240))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (call $write (local.get $p) (i32.sub (i32.const 240) (local.get $p))))
  (func (export "_start")
    (local $got i32) (local $a i64) (local $b i64) (local $p i32) (local $end i32)
    (local $matches i32) (local $nonzero i32)
    (block $eof
      (loop $more
        (i32.store (i32.const 0) (i32.add (i32.const 8192) (local.get $got)))
        (i32.store (i32.const 4) (i32.sub (i32.const 16) (local.get $got)))
        (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (local.set $got (i32.add (local.get $got) (i32.load (i32.const 8))))
        (br_if $more (i32.lt_u (local.get $got) (i32.const 16)))))
    (if (i32.ne (local.get $got) (i32.const 16)) (then unreachable))
    (local.set $a (i64.load (i32.const 8192)))
    (local.set $b (i64.load (i32.const 8200)))
    (memory.fill (i32.const 8192) (i32.const 0) (i32.const 16))
    (if (i32.eq (memory.grow (i32.sub (i32.const 64) (memory.size))) (i32.const -1)) (then unreachable))
    (local.set $end (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 16)))
    (loop $at
      (if (i64.eq (i64.load (local.get $p)) (local.get $a))
        (then
          (if (i64.eq (i64.load (i32.add (local.get $p) (i32.const 8))) (local.get $b))
            (then (local.set $matches (i32.add (local.get $matches) (i32.const 1)))))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br_if $at (i32.le_u (local.get $p) (local.get $end))))
    (local.set $p (i32.const 65536))
    (local.set $end (i32.mul (memory.size) (i32.const 65536)))
    (loop $word
      (if (i64.ne (i64.load (local.get $p)) (i64.const 0))
        (then (local.set $nonzero (i32.add (local.get $nonzero) (i32.const 1)))))
      (local.set $p (i32.add (local.get $p) (i32.const 8)))
      (br_if $word (i32.lt_u (local.get $p) (local.get $end))))
    (call $write (i32.const 300) (i32.const 8))
    (call $print_num (local.get $matches))
    (call $write (i32.const 310) (i32.const 9))
    (call $print_num (local.get $nonzero))
    (call $write (i32.const 320) (i32.const 8))
    (call $print_num (i32.wrap_i64 (global.get $g)))
    (call $write (i32.const 330) (i32.const 1))))
