//! A test function for the microVM tier: stdin upper-cased to stdout, "upper: <n> bytes" to
//! stderr; exits 3 when the input is `fail`. Static when built for x86_64-unknown-linux-musl.

use std::io::{Read, Write};

fn main() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    if input == b"fail" {
        std::process::exit(3);
    }
    eprintln!("upper: {} bytes", input.len());
    std::io::stdout()
        .write_all(&input.to_ascii_uppercase())
        .expect("stdout");
}
