//! Progress bars (per layer: bytes and rate) on a terminal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ocicrypt_core::image::ops::{NoProgress, Progress};

/// Progress bars on stderr, one per layer in flight.
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    style: ProgressStyle,
}

impl Bars {
    fn new() -> Self {
        let style = ProgressStyle::with_template(
            "{prefix:>8} {msg:12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
            style,
        }
    }
}

impl Progress for Bars {
    fn start(&self, id: &str, size: u64, action: &str) {
        let bar = self.multi.add(
            ProgressBar::new(size)
                .with_style(self.style.clone())
                .with_prefix(action.to_owned())
                .with_message(id.to_owned()),
        );
        self.bars.lock().expect("bars lock").insert(id.to_owned(), bar);
    }

    fn advance(&self, id: &str, n: u64) {
        if let Some(b) = self.bars.lock().expect("bars lock").get(id) {
            b.inc(n);
        }
    }

    fn finish(&self, id: &str) {
        if let Some(b) = self.bars.lock().expect("bars lock").remove(id) {
            b.finish();
        }
    }
}

/// Bars when `show` (stderr is a terminal, not `--json`/`--quiet`), else nothing.
pub fn reporter(show: bool) -> Arc<dyn Progress> {
    if show {
        Arc::new(Bars::new())
    } else {
        Arc::new(NoProgress)
    }
}
