//! A test function for the microVM tier: stdin upper-cased to stdout, "upper: <n> bytes" to
//! stderr. Special inputs: `fail` exits 3; `spin` loops forever (a timeout test); `random` prints
//! 16 bytes of `/dev/urandom` in hex (guests restored from one snapshot differ only if reseeded);
//! `env` prints its environment as `KEY=VALUE` lines; `hog` allocates and touches memory until the
//! kernel kills it (a memory-limit test).
//! Static when built for x86_64-unknown-linux-musl.

use std::io::{Read, Write};

fn main() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    match input.as_slice() {
        b"fail" => std::process::exit(3),
        b"spin" => loop {
            std::hint::spin_loop();
        },
        b"hog" => {
            let mut chunks = Vec::new();
            loop {
                let mut chunk = vec![0u8; 16 << 20];
                for page in chunk.chunks_mut(4096) {
                    page[0] = 1;
                }
                chunks.push(std::hint::black_box(chunk));
            }
        }
        b"env" => {
            for (key, value) in std::env::vars() {
                println!("{key}={value}");
            }
            return;
        }
        b"random" => {
            let mut bytes = [0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .expect("/dev/urandom");
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            print!("{hex}");
            return;
        }
        _ => {}
    }
    eprintln!("upper: {} bytes", input.len());
    std::io::stdout()
        .write_all(&input.to_ascii_uppercase())
        .expect("stdout");
}
