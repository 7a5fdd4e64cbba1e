;; Sleeps in a host call (poll_oneoff on a relative clock) for as many milliseconds as the request
;; body says (ASCII digits, default 500), then prints "slept".
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "slept")
  (func $read_ms (result i64)
    (local $n i32) (local $i i32) (local $c i32) (local $ms i64)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 32))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (if (i32.eqz (local.get $n)) (then (return (i64.const 500))))
    (block $done
      (loop $digit
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $c (i32.sub (i32.load8_u (i32.add (i32.const 1024) (local.get $i))) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10)) (i64.extend_i32_u (local.get $c))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digit)))
    (local.get $ms))
  (func (export "_start")
    ;; subscription at 64 (48 bytes): userdata u64, tag u8 = 0 (clock), clock id u32 at +16 = 1
    ;; (monotonic), timeout u64 at +24 in ns, precision at +32, flags u16 at +40 = 0 (relative)
    (i64.store (i32.const 64) (i64.const 7))
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.mul (call $read_ms) (i64.const 1000000)))
    (i64.store (i32.const 96) (i64.const 0))
    (i32.store16 (i32.const 104) (i32.const 0))
    (if (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8)) (then unreachable))
    (i32.store (i32.const 0) (i32.const 900))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
