//! Guests generated for the deploy scenarios. Each call with another `salt` gives a module with
//! different code, hence a different digest: Kiln compiles it for real at deploy instead of finding
//! it in its compile cache, and every deployed function holds its own compiled code, as distinct
//! functions of real users do.

use std::fmt::Write;

/// `guests/wat/hello.wat` (prints "Hello from Kiln!"), plus one function returning `salt`, so the
/// code differs by salt and the work per invoke does not.
pub fn hello(salt: u64) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello from Kiln!\n")
  (func $salt (result i64) (i64.const {salt}))
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    );
    wat::parse_str(text).expect("the hello template is valid")
}

/// A large module: `functions` functions of a few dozen instructions each (a loop, arithmetic, a
/// call to the previous one), so compile time grows with code size the way a real program's does.
/// `_start` prints the same greeting as `hello`.
pub fn large(functions: usize, salt: u64) -> Vec<u8> {
    let mut text = String::from(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello from Kiln!\n")
"#,
    );
    for i in 0..functions {
        let previous = if i == 0 {
            "(local.get $x)".to_owned()
        } else {
            format!("(call $f{} (local.get $x))", i - 1)
        };
        let _ = writeln!(
            text,
            r#"  (func $f{i} (param $x i64) (result i64) (local $acc i64) (local $n i32)
    (local.set $acc (i64.const {seed}))
    (local.set $n (i32.wrap_i64 (local.get $x)))
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $acc (i64.add (i64.mul (local.get $acc) (i64.const 6364136223846793005)) (i64.const {i})))
      (local.set $acc (i64.xor (local.get $acc) (i64.shr_u (local.get $acc) (i64.const 29))))
      (i64.store (i32.const 64) (local.get $acc))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $next)))
    (if (result i64) (i64.gt_u (local.get $acc) (i64.const {i}))
      (then (i64.add (local.get $acc) (i64.load (i32.const 64))))
      (else (i64.sub {previous} (local.get $acc)))))"#,
            seed = salt.wrapping_mul(31).wrapping_add(i as u64) as i64,
        );
    }
    text.push_str(
        r#"  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#,
    );
    wat::parse_str(text).expect("the large template is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_modules_validate_and_differ_by_salt() {
        let engine = wasmtime::Engine::default();
        for wasm in [hello(1), large(20, 1)] {
            wasmtime::Module::validate(&engine, &wasm).expect("valid module");
        }
        assert_ne!(hello(1), hello(2));
        assert_ne!(large(20, 1), large(20, 2));
        assert!(large(2000, 0).len() > 100 * hello(0).len());
    }
}
