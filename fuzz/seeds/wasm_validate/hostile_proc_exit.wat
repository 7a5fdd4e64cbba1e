;; Hostile: exits with whatever code stdin says (unsigned decimal, wrapping to 32 bits, so
;; "4294967295" is -1 and "2147483648" is i32::MIN), after printing "exiting" on stdout and "bye"
;; on stderr. If proc_exit ever returns, it traps.
;; Expected: 0 → 200 "exiting"; 1..=125 → 502 function_failed with that exit_code and stderr
;; "bye"; 126 and up (as WASI's exit status is unsigned: -1, i32::MIN too) → 502 function_failed
;; "exit with invalid exit status", no exit_code.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 900) "exiting\n")
  (data (i32.const 920) "bye\n")
  (func $read_code (result i32)
    (local $n i32) (local $i i32) (local $c i32) (local $code i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 32))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (block $done
      (loop $digit
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $c (i32.sub (i32.load8_u (i32.add (i32.const 1024) (local.get $i))) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $code (i32.add (i32.mul (local.get $code) (i32.const 10)) (local.get $c)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digit)))
    (local.get $code))
  (func (export "_start")
    (local $code i32)
    (local.set $code (call $read_code))
    (i32.store (i32.const 0) (i32.const 900))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 0) (i32.const 920))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (local.get $code))
    unreachable))
