//! The migration progress bar.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use aiecs_storage::ops::migrate::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar with rate and ETA, drawn only once a migration has run for a second, so
/// short runs print nothing but their summary.
pub struct Bar {
    bar: ProgressBar,
    started: Instant,
    shown: Mutex<bool>,
}

impl Bar {
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} units ({per_sec}, ETA {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar {
            bar,
            started: Instant::now(),
            shown: Mutex::new(false),
        }
    }

    pub fn update(&self, p: &Progress) {
        if let Some(t) = &p.totals {
            self.bar.set_length(t.units());
        }
        self.bar.set_position(p.units_done());
        self.bar
            .set_message(format!("{:?}", p.phase).to_lowercase());
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if !*shown && self.started.elapsed() > Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            *shown = true;
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
