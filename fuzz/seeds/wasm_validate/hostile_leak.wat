;; Hostile: tries to leak data between invocations through reused pool slots (the bug class of
;; CVE-2022-39393). stdin is a mode byte and a 64-byte secret chosen by the caller:
;;   'W' writes the secret into the data area (over the data segment at 1024), into a mutable
;;       global, and repeated over [64 KiB, 256 KiB) of a memory grown to 4 MiB (pages the pool
;;       keeps resident and resets with memset); then holds the instance for 500 ms (so many
;;       writers occupy many slots at once), prints "wrote", exits 0;
;;   'B' does the same and also fills [2 MiB, 4 MiB), past the 2 MiB of dirty pages the pool
;;       keeps resident (pages it decommits instead);
;;   'T' writes as 'B' does, then traps instead of exiting;
;;   'S' keeps the secret's first 16 bytes in locals only, zeroes its input buffer, grows memory to
;;       the same 4 MiB, and counts every byte offset where those 16 bytes appear, the non-zero
;;       8-byte words in [64 KiB, 4 MiB), whether the data segment still reads as shipped, and
;;       the global;
;;   'P' (the positive control) writes as 'B' does, then scans as 'S' does, in one invocation.
;; Expected: 'W' and 'B' 200 "wrote"; 'T' 502; 'S' (same function, later) 200
;; "matches=0 nonzero=0 data=same global=0"; 'P' 200 "matches=35841 nonzero=286720
;; data=changed global=<non-zero>" for a secret without zero bytes.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $g (mut i64) (i64.const 0))
  ;; the data area (64 bytes at 1024) and a reference copy of it (at 1536)
  (data (i32.const 1024) "kiln leak test data area: every invocation must see this text...")
  (data (i32.const 1536) "kiln leak test data area: every invocation must see this text...")
  (data (i32.const 300) "wrote\n")
  (data (i32.const 310) "matches=")
  (data (i32.const 320) " nonzero=")
  (data (i32.const 330) " data=same")
  (data (i32.const 342) " data=changed")
  (data (i32.const 356) " global=")
  (data (i32.const 366) "\n")

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
  ;; stdin into 2048.. until EOF or 128 bytes; returns the byte count
  (func $read_input (result i32)
    (local $got i32)
    (block $eof
      (loop $more
        (i32.store (i32.const 0) (i32.add (i32.const 2048) (local.get $got)))
        (i32.store (i32.const 4) (i32.sub (i32.const 128) (local.get $got)))
        (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (local.set $got (i32.add (local.get $got) (i32.load (i32.const 8))))
        (br_if $more (i32.lt_u (local.get $got) (i32.const 128)))))
    (local.get $got))
  ;; memory to 64 pages (4 MiB), whatever it is now
  (func $grow_to_4mib
    (if (i32.lt_u (memory.size) (i32.const 64))
      (then
        (if (i32.eq (memory.grow (i32.sub (i32.const 64) (memory.size))) (i32.const -1))
          (then unreachable)))))
  ;; fills [dst, dst+len) with the 64-byte secret at 2049, repeated (len a multiple of 64)
  (func $fill (param $dst i32) (param $len i32)
    (local $n i32)
    (memory.copy (local.get $dst) (i32.const 2049) (i32.const 64))
    (local.set $n (i32.const 64))
    (loop $double
      (if (i32.lt_u (local.get $n) (local.get $len))
        (then
          (memory.copy (i32.add (local.get $dst) (local.get $n)) (local.get $dst)
            (select (local.get $n) (i32.sub (local.get $len) (local.get $n))
              (i32.le_u (local.get $n) (i32.sub (local.get $len) (local.get $n)))))
          (local.set $n (i32.shl (local.get $n) (i32.const 1)))
          (br $double)))))
  (func $sleep_500ms
    (i64.store (i32.const 64) (i64.const 1))
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const 500000000))
    (i64.store (i32.const 96) (i64.const 0))
    (i32.store16 (i32.const 104) (i32.const 0))
    (drop (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8))))
  (func $write_secret (param $big i32)
    (call $grow_to_4mib)
    (memory.copy (i32.const 1024) (i32.const 2049) (i32.const 64))
    (global.set $g (i64.load (i32.const 2049)))
    (call $fill (i32.const 65536) (i32.const 196608))
    (if (local.get $big)
      (then (call $fill (i32.const 2097152) (i32.const 2097152)))))

  (func $scan
    (local $a i64) (local $b i64) (local $p i32) (local $end i32) (local $matches i32) (local $nonzero i32)
    (local.set $a (i64.load (i32.const 2049)))
    (local.set $b (i64.load (i32.const 2057)))
    (memory.fill (i32.const 2048) (i32.const 0) (i32.const 128))
    (call $grow_to_4mib)
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
    (call $write (i32.const 310) (i32.const 8))
    (call $print_num (local.get $matches))
    (call $write (i32.const 320) (i32.const 9))
    (call $print_num (local.get $nonzero))
    (local.set $p (i32.const 0))
    (local.set $nonzero (i32.const 0))
    (loop $cmp
      (if (i64.ne (i64.load (i32.add (i32.const 1024) (local.get $p)))
                  (i64.load (i32.add (i32.const 1536) (local.get $p))))
        (then (local.set $nonzero (i32.const 1))))
      (local.set $p (i32.add (local.get $p) (i32.const 8)))
      (br_if $cmp (i32.lt_u (local.get $p) (i32.const 64))))
    (if (local.get $nonzero)
      (then (call $write (i32.const 342) (i32.const 13)))
      (else (call $write (i32.const 330) (i32.const 10))))
    (call $write (i32.const 356) (i32.const 8))
    (call $print_num (i32.wrap_i64 (i64.or (global.get $g) (i64.shr_u (global.get $g) (i64.const 32)))))
    (call $write (i32.const 366) (i32.const 1)))

  (func (export "_start")
    (local $mode i32)
    (if (i32.lt_u (call $read_input) (i32.const 17)) (then unreachable))
    (local.set $mode (i32.load8_u (i32.const 2048)))
    (if (i32.or (i32.eq (local.get $mode) (i32.const 0x57)) ;; 'W'
                (i32.eq (local.get $mode) (i32.const 0x42))) ;; 'B'
      (then
        (call $write_secret (i32.eq (local.get $mode) (i32.const 0x42)))
        (call $sleep_500ms)
        (call $write (i32.const 300) (i32.const 6))
        (return)))
    (if (i32.eq (local.get $mode) (i32.const 0x54)) ;; 'T'
      (then
        (call $write_secret (i32.const 1))
        unreachable))
    (if (i32.eq (local.get $mode) (i32.const 0x53)) ;; 'S'
      (then (call $scan) (return)))
    (if (i32.eq (local.get $mode) (i32.const 0x50)) ;; 'P'
      (then (call $write_secret (i32.const 1)) (call $scan) (return)))
    unreachable))
