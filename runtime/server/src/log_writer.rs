//! Where Kiln's own log lines go: standard error, with the one-line-per-invocation records batched.
//!
//! At full speed a server logs one line per invocation; a `write` to stderr for each was 3% of
//! the CPU of an HTTP-trigger request (perf, `benches/run.sh` load). Invocation lines are appended
//! to a buffer instead and written out together: by a flusher thread every `FLUSH_EVERY`, as soon
//! as `MAX_BUFFERED` bytes wait, and before any other line. Every other line (start-up, warnings,
//! errors) is written at once, after whatever is buffered, so the output keeps its order and an
//! error is never held back. At most `FLUSH_EVERY` of invocation lines can be lost if the process
//! is killed; a normal exit or a panic writes them first (`flush`, and the panic hook).

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// The target of the per-invocation lines (`kiln_core::telemetry`); the only ones batched.
pub use kiln_core::telemetry::INVOCATION_TARGET;
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
const MAX_BUFFERED: usize = 64 * 1024;

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static FLUSHER: OnceLock<()> = OnceLock::new();

/// The writer for `tracing_subscriber::fmt`: stderr, batching invocation lines.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl Stderr {
    /// Starts the flusher thread (once) and makes panics write the buffered lines first.
    pub fn install() -> Stderr {
        FLUSHER.get_or_init(|| {
            std::thread::Builder::new()
                .name("kiln-log".into())
                .spawn(|| loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                })
                .expect("spawning the log flusher");
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // `try_lock`: a panic while the buffer is held must not deadlock its own report.
                if let Ok(mut buffer) = BUFFER.try_lock() {
                    write_out(&mut buffer, &[]);
                }
                previous(info);
            }));
        });
        Stderr
    }
}

/// Writes out the buffered invocation lines.
pub fn flush() {
    let mut buffer = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    write_out(&mut buffer, &[]);
}

/// Writes `buffer` and then `line` to stderr, in one call when it can, and empties `buffer`.
fn write_out(buffer: &mut Vec<u8>, line: &[u8]) {
    let mut stderr = std::io::stderr().lock();
    if buffer.is_empty() {
        let _ = stderr.write_all(line);
        return;
    }
    buffer.extend_from_slice(line);
    // A full or closed stderr must not stop the server; the lines are dropped.
    let _ = stderr.write_all(buffer);
    buffer.clear();
}

/// One formatted line on its way out: `tracing_subscriber` formats an event into a string and
/// writes it here with a single `write_all`.
pub struct LineWriter {
    batched: bool,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut buffer = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
        if self.batched && buffer.len() + line.len() <= MAX_BUFFERED {
            buffer.extend_from_slice(line);
        } else {
            write_out(&mut buffer, line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { batched: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            batched: meta.target() == INVOCATION_TARGET && *meta.level() >= tracing::Level::INFO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(level: tracing::Level) -> tracing::Metadata<'static> {
        let fields = tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE));
        tracing::Metadata::new(
            "event",
            INVOCATION_TARGET,
            level,
            None,
            None,
            None,
            fields,
            tracing::metadata::Kind::EVENT,
        )
    }

    #[test]
    fn invocation_lines_wait_and_others_go_out_with_them_in_order() {
        let invocation = event(tracing::Level::INFO);
        let warning = event(tracing::Level::WARN);
        assert!(Stderr.make_writer_for(&invocation).batched);
        assert!(!Stderr.make_writer_for(&warning).batched);
        assert!(!Stderr.make_writer().batched);

        Stderr.make_writer_for(&invocation).write_all(b"first\n").unwrap();
        assert!(BUFFER.lock().unwrap().ends_with(b"first\n"), "an invocation line waits");
        Stderr.make_writer_for(&warning).write_all(b"second\n").unwrap();
        assert!(
            BUFFER.lock().unwrap().is_empty(),
            "a warning takes the waiting lines out with it"
        );
        Stderr.make_writer_for(&invocation).write_all(b"third\n").unwrap();
        flush();
        assert!(BUFFER.lock().unwrap().is_empty());
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!("only the identity of this callsite is used")
        }
    }
}
