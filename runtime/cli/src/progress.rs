//! Progress display for uploads: a byte bar while the artifact is sent, then a spinner while the
//! server validates, compiles and snapshots it (the answer comes only once the version is
//! committed). Both draw on stderr and only on a terminal, so scripts and `--json` see nothing.

use std::io::Read;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Artifacts smaller than this upload too fast for a bar to mean anything: they get the spinner only.
const BAR_THRESHOLD: u64 = 1 << 20;

/// A reader that advances a bar, and turns it into a spinner when the last byte has been read.
pub struct Upload<R> {
    inner: R,
    bar: ProgressBar,
    done: bool,
}

impl<R: Read> Upload<R> {
    pub fn new(inner: R, len: u64, quiet: bool) -> Upload<R> {
        let bar = if !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        let mut upload = Upload {
            inner,
            bar,
            done: false,
        };
        if len >= BAR_THRESHOLD {
            upload.bar.set_style(
                ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                    .expect("static template"),
            );
        } else {
            upload.spin();
        }
        upload
    }

    fn spin(&mut self) {
        self.done = true;
        self.bar.set_style(
            ProgressStyle::with_template("{spinner} compiling on the server ({elapsed})").expect("static template"),
        );
        self.bar.enable_steady_tick(Duration::from_millis(100));
    }

    /// The handle to clear once the server has answered.
    pub fn bar(&self) -> ProgressBar {
        self.bar.clone()
    }
}

impl<R: Read> Read for Upload<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        if n == 0 && !buf.is_empty() && !self.done {
            self.spin();
        }
        Ok(n)
    }
}
