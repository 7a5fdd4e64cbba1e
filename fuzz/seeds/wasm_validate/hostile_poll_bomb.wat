;; Hostile: a poll_oneoff bomb. Grows memory to 96 MiB, fills it with N clock subscriptions (each
;; a one-hour relative sleep; N is the decimal number on stdin, default 480,000, at most
;; 1,200,000), then waits on all of them in one poll_oneoff call. The host builds a pollable and a
;; timer for every subscription, so guest memory turns into host memory, and host CPU time spent
;; inside one host call, where the epoch cannot interrupt it.
;; Expected: with N above Kiln's 10,000 host objects per instance, 502 "resource table has no free
;; keys", fast, with the server responsive; below it, 504 timeout at the function's timeout_ms.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $read_n (result i32)
    (local $n i32) (local $i i32) (local $c i32) (local $v i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 32))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (if (i32.eqz (local.get $n)) (then (return (i32.const 480000))))
    (block $done
      (loop $digit
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $c (i32.sub (i32.load8_u (i32.add (i32.const 1024) (local.get $i))) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $v (i32.add (i32.mul (local.get $v) (i32.const 10)) (local.get $c)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digit)))
    (select (local.get $v) (i32.const 1200000) (i32.le_u (local.get $v) (i32.const 1200000))))
  (func (export "_start")
    (local $n i32) (local $i i32) (local $p i32)
    (local.set $n (call $read_n))
    ;; 1536 pages = 96 MiB: subscriptions (48 bytes each) from 64 KiB, events (32 bytes each) after
    (if (i32.eq (memory.grow (i32.const 1535)) (i32.const -1)) (then unreachable))
    (local.set $p (i32.const 65536))
    (block $full
      (loop $fill
        (br_if $full (i32.ge_u (local.get $i) (local.get $n)))
        (i64.store (local.get $p) (i64.extend_i32_u (local.get $i)))       ;; userdata
        (i32.store8 offset=8 (local.get $p) (i32.const 0))                 ;; tag: clock
        (i32.store offset=16 (local.get $p) (i32.const 1))                 ;; monotonic
        (i64.store offset=24 (local.get $p) (i64.const 3600000000000))     ;; one hour
        (i64.store offset=32 (local.get $p) (i64.const 0))                 ;; precision
        (i32.store16 offset=40 (local.get $p) (i32.const 0))               ;; relative
        (local.set $p (i32.add (local.get $p) (i32.const 48)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $fill)))
    (drop (call $poll_oneoff (i32.const 65536) (local.get $p) (local.get $n) (i32.const 16)))
    unreachable))
