//! Capturing what the logging layer and the health checker write through `tracing`.
#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The lines at `level` (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`).
    pub fn lines_at(&self, level: &str) -> Vec<String> {
        let tag = format!(" {level} ");
        self.text()
            .lines()
            .filter(|l| l.contains(&tag))
            .map(str::to_owned)
            .collect()
    }
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Tracing caches each callsite's interest process-wide, computed by the first thread
/// that reaches it. A test thread without a subscriber would cache "never" and blind a
/// capturing test running in parallel. A global, always-interested registry (it prints
/// nothing) keeps every callsite "sometimes", so each event is checked against the
/// subscriber of the thread that emits it.
pub fn anchor_interest() {
    static ANCHOR: std::sync::Once = std::sync::Once::new();
    ANCHOR.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

/// Installs a plain-text subscriber at `level` on this thread (the tests run on a
/// current-thread runtime) until the guard drops.
pub fn capture(level: LevelFilter) -> (Capture, tracing::subscriber::DefaultGuard) {
    anchor_interest();
    let cap = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(cap.clone())
        .with_max_level(level)
        .finish();
    (cap, tracing::subscriber::set_default(subscriber))
}
