//! The history file of a `chaos` run: every operation and its outcome, one
//! JSON object a line, stamped with seconds since the start of the run, so a
//! lost message's story can be read back after the fact (which connection
//! was up, which fault was on, what each POST was answered).

use anyhow::{Context, Result};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

pub struct History {
    out: Mutex<BufWriter<std::fs::File>>,
}

impl History {
    pub fn create(path: &Path) -> Result<History> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("creating the history file {}", path.display()))?;
        Ok(History {
            out: Mutex::new(BufWriter::new(f)),
        })
    }

    /// Appends `event` with its time `t` (seconds since the start). A write
    /// error is not worth stopping the run for: the checks run on the
    /// in-memory record, the file only explains them.
    pub fn log(&self, t: f64, mut event: serde_json::Value) {
        event["t"] = serde_json::json!((t * 1000.0).round() / 1000.0);
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "{event}");
    }

    pub fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}
