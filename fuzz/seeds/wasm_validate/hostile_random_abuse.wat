;; Hostile: abuses random_get. The first byte of stdin picks how:
;;   'h' asks for 4 GiB - 1 bytes of randomness in one call (into a one-page memory);
;;   'o' asks for 1 MiB (the host's per-call maximum) into a one-page memory: out of bounds;
;;   'l' grows memory to 65 MiB and asks for 1 MiB at a time, legitimately, forever;
;;   'f' grows memory by 16 MiB, fills all of that with randomness twice (1 MiB a call), then prints
;;       "errno=0 zero_words=N" (N = 8-byte words still zero: ~0 if the bytes are random).
;; Expected: 'h' 502 function_failed naming the host's 1 MiB random limit; 'o' 502
;; function_failed "out of bounds"; 'l' 504 timeout, the server responsive throughout (each call is
;; a few ms of host work); 'f' 200 "errno=0 zero_words=0".
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get"
    (func $random_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 300) "errno=")
  (data (i32.const 310) " zero_words=")
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
    (local $mode i32) (local $errno i32) (local $round i32) (local $p i32) (local $zeros i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $mode (i32.load8_u (i32.const 1024)))
    (if (i32.eq (local.get $mode) (i32.const 0x68)) ;; 'h'
      (then
        (local.set $errno (call $random_get (i32.const 0) (i32.const -1)))))
    (if (i32.eq (local.get $mode) (i32.const 0x6F)) ;; 'o'
      (then
        (local.set $errno (call $random_get (i32.const 0) (i32.const 1048576)))))
    (if (i32.eq (local.get $mode) (i32.const 0x6C)) ;; 'l'
      (then
        (if (i32.eq (memory.grow (i32.const 1039)) (i32.const -1)) (then unreachable))
        (loop $again
          (drop (call $random_get (i32.const 65536) (i32.const 1048576)))
          (br $again))))
    (if (i32.eq (local.get $mode) (i32.const 0x66)) ;; 'f'
      (then
        (if (i32.eq (memory.grow (i32.const 256)) (i32.const -1)) (then unreachable))
        (loop $fill
          ;; 1 MiB per call (the host's per-call maximum), over the 16 MiB twice
          (local.set $errno
            (i32.or (local.get $errno)
              (call $random_get
                (i32.add (i32.const 65536) (i32.shl (i32.and (local.get $round) (i32.const 15)) (i32.const 20)))
                (i32.const 1048576))))
          (local.set $round (i32.add (local.get $round) (i32.const 1)))
          (br_if $fill (i32.lt_u (local.get $round) (i32.const 32))))
        (local.set $p (i32.const 65536))
        (loop $count
          (if (i64.eqz (i64.load (local.get $p)))
            (then (local.set $zeros (i32.add (local.get $zeros) (i32.const 1)))))
          (local.set $p (i32.add (local.get $p) (i32.const 8)))
          (br_if $count (i32.lt_u (local.get $p) (i32.const 16842752))))))
    (call $write (i32.const 300) (i32.const 6))
    (call $print_num (local.get $errno))
    (call $write (i32.const 310) (i32.const 12))
    (call $print_num (local.get $zeros))
    (call $write (i32.const 330) (i32.const 1))))
