;; Hostile: tries to escape to the host's filesystem. No directory is preopened, so it probes:
;; fd_prestat_get on fds 0..=63 (counting preopens), path_open of "../etc/passwd" and
;; "/etc/passwd" relative to fd 3, of "../../etc/passwd" relative to stdin and to fd -1, of "."
;; as a directory, fd_read and fd_readdir on fd 3, path_create_directory and path_filestat_get
;; under fd 3. Every errno goes to stdout as "name=errno"; any fd that does open is read and its
;; contents printed after "LEAKED:". Then it exits 0.
;; Expected: 200, every errno non-zero (all 8, badf: there is no directory fd to start from),
;; "preopens=0", and no "LEAKED:" and no file contents anywhere in the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_readdir"
    (func $fd_readdir (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory"
    (func $path_create_directory (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_filestat_get"
    (func $path_filestat_get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; paths
  (data (i32.const 512) "../etc/passwd")
  (data (i32.const 544) "/etc/passwd")
  (data (i32.const 576) "../../etc/passwd")
  (data (i32.const 608) ".")
  (data (i32.const 616) "escape")
  ;; labels
  (data (i32.const 640) "prestat3")
  (data (i32.const 656) "preopens")
  (data (i32.const 672) "open_dotdot")
  (data (i32.const 688) "open_abs")
  (data (i32.const 704) "open_stdin")
  (data (i32.const 720) "open_neg")
  (data (i32.const 736) "open_dot")
  (data (i32.const 752) "read3")
  (data (i32.const 768) "readdir3")
  (data (i32.const 784) "mkdir3")
  (data (i32.const 800) "stat3")
  (data (i32.const 816) "=")
  (data (i32.const 818) "\n")
  (data (i32.const 820) "LEAKED:")

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
  ;; "label=value\n"
  (func $report (param $label i32) (param $len i32) (param $value i32)
    (call $write (local.get $label) (local.get $len))
    (call $write (i32.const 816) (i32.const 1))
    (call $print_num (local.get $value))
    (call $write (i32.const 818) (i32.const 1)))
  ;; If an open succeeded, read what it opened and print it: a sandbox hole would show here.
  (func $dump_if_open (param $errno i32)
    (if (i32.eqz (local.get $errno))
      (then
        (i32.store (i32.const 32) (i32.const 4096))
        (i32.store (i32.const 36) (i32.const 4096))
        (drop (call $fd_read (i32.load (i32.const 16)) (i32.const 32) (i32.const 1) (i32.const 40)))
        (call $write (i32.const 820) (i32.const 7))
        (call $write (i32.const 4096) (i32.load (i32.const 40)))
        (call $write (i32.const 818) (i32.const 1)))))
  ;; path_open(dirfd, path, oflags) with every right asked for; the new fd lands at 16
  (func $open (param $dirfd i32) (param $path i32) (param $len i32) (param $oflags i32) (result i32)
    (local $errno i32)
    (i32.store (i32.const 16) (i32.const -1))
    (local.set $errno
      (call $path_open (local.get $dirfd) (i32.const 1) (local.get $path) (local.get $len)
        (local.get $oflags) (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 16)))
    (call $dump_if_open (local.get $errno))
    (local.get $errno))

  (func (export "_start")
    (local $fd i32) (local $found i32)
    (call $report (i32.const 640) (i32.const 8) (call $fd_prestat_get (i32.const 3) (i32.const 100)))
    (loop $probe
      (if (i32.eqz (call $fd_prestat_get (local.get $fd) (i32.const 100)))
        (then (local.set $found (i32.add (local.get $found) (i32.const 1)))))
      (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
      (br_if $probe (i32.lt_u (local.get $fd) (i32.const 64))))
    (call $report (i32.const 656) (i32.const 8) (local.get $found))
    (call $report (i32.const 672) (i32.const 11) (call $open (i32.const 3) (i32.const 512) (i32.const 13) (i32.const 0)))
    (call $report (i32.const 688) (i32.const 8) (call $open (i32.const 3) (i32.const 544) (i32.const 11) (i32.const 0)))
    (call $report (i32.const 704) (i32.const 10) (call $open (i32.const 0) (i32.const 576) (i32.const 16) (i32.const 0)))
    (call $report (i32.const 720) (i32.const 8) (call $open (i32.const -1) (i32.const 576) (i32.const 16) (i32.const 0)))
    (call $report (i32.const 736) (i32.const 8) (call $open (i32.const 3) (i32.const 608) (i32.const 1) (i32.const 2)))
    (i32.store (i32.const 32) (i32.const 4096))
    (i32.store (i32.const 36) (i32.const 4096))
    (call $report (i32.const 752) (i32.const 5)
      (call $fd_read (i32.const 3) (i32.const 32) (i32.const 1) (i32.const 40)))
    (call $report (i32.const 768) (i32.const 8)
      (call $fd_readdir (i32.const 3) (i32.const 4096) (i32.const 4096) (i64.const 0) (i32.const 40)))
    (call $report (i32.const 784) (i32.const 6)
      (call $path_create_directory (i32.const 3) (i32.const 616) (i32.const 6)))
    (call $report (i32.const 800) (i32.const 5)
      (call $path_filestat_get (i32.const 3) (i32.const 1) (i32.const 544) (i32.const 11) (i32.const 4096)))))
