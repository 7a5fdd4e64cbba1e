//! What Kiln's test suites share: a throwaway PostgreSQL server ([`postgres`]), a throwaway
//! S3-compatible server ([`s3`]), and a way for a
//! test that cannot run on this host to say so that CI can count. `skip` prints `SKIPPED <test>: <reason>` and, when `KILN_SKIP_LOG` names
//! a file (the README's test command sets it), appends the same line there; `runtime/scripts/test.sh`
//! prints that file and the totals when the suite ends, so a skip is never a silent green.

use std::io::Write;

pub mod postgres;
pub mod s3;

/// Records that `test` did not run here, and why. The caller returns right after.
pub fn skip(test: &str, reason: &str) {
    // One line per skip, whatever the reason's own line breaks.
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("KILN_SKIP_LOG") {
        // O_APPEND writes of one short line are atomic, so parallel tests do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            panic!("cannot record a skip in {}: {e}", std::path::Path::new(&path).display());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_skip_is_one_line_in_the_log() {
        let dir = std::env::temp_dir().join(format!("kiln-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        // SAFETY of set_var: this crate's only test; no other thread reads the environment.
        unsafe { std::env::set_var("KILN_SKIP_LOG", &log) };
        super::skip("some_test", "no /dev/kvm\n  here");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "SKIPPED some_test: no /dev/kvm here\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_throwaway_s3_server_serves_then_leaves_nothing() {
        let server = super::s3::S3Server::start().unwrap();
        let addr = server.endpoint.strip_prefix("http://").unwrap().to_owned();
        assert!(std::net::TcpStream::connect(&addr).is_ok(), "it listens");
        assert!(server.object_path("").is_dir(), "the bucket exists");
        let dir = server.object_path("");
        drop(server);
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "the server stopped with its handle"
        );
        assert!(!dir.exists(), "its directory is gone");
    }

    #[test]
    fn a_throwaway_postgres_serves_then_leaves_nothing() {
        let server = match super::postgres::Postgres::start() {
            Ok(server) => server,
            Err(reason) => return super::skip("a_throwaway_postgres_serves_then_leaves_nothing", &reason),
        };
        let url = server.create_database().unwrap();
        let name = url.rsplit('/').next().unwrap();
        assert_eq!(server.sql(name, "SELECT 40 + 2").unwrap(), "42");
        let port = server.port;
        drop(server);
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server stopped with its handle"
        );
    }
}
