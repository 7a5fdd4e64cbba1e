;; Hostile: reads every environment variable it can see and prints them, one per line. Expected:
;; 200 with exactly the variables of the function's config `env` — nothing of the host's (no PATH,
;; no HOME, no KILN_ADMIN_TOKEN).
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0: count, 4: buffer size, 16: iovec, 24: written, 64..: pointers, 4096..: the strings
  (func (export "_start")
    (local $i i32) (local $size i32)
    (if (call $environ_sizes_get (i32.const 0) (i32.const 4)) (then unreachable))
    (local.set $size (i32.load (i32.const 4)))
    (if (i32.gt_u (local.get $size) (i32.const 60000)) (then unreachable))
    (if (call $environ_get (i32.const 64) (i32.const 4096)) (then unreachable))
    ;; NUL-separated strings become lines
    (block $done
      (loop $each
        (br_if $done (i32.ge_u (local.get $i) (local.get $size)))
        (if (i32.eqz (i32.load8_u (i32.add (i32.const 4096) (local.get $i))))
          (then (i32.store8 (i32.add (i32.const 4096) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each)))
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (local.get $size))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
