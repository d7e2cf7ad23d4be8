//! What an import did, counted as it goes: printed at the end (and when it
//! stops on an error), with a progress line on stderr when that is a
//! terminal.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Written by this run (or, in a dry run, that would be).
    pub imported: u64,
    /// Found already written by an earlier run.
    pub already: u64,
}

/// The things an import counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum What {
    UserAgents,
    Channels,
    Messages,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::UserAgents => "user agents",
            What::Channels => "channels",
            What::Messages => "messages",
        }
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    pub users: Counts,
    pub channels: Counts,
    pub messages: Counts,
    pub skipped: BTreeMap<(What, String), u64>,
}

impl Summary {
    pub fn skip(&mut self, what: What, reason: &str, n: u64) {
        if n > 0 {
            *self.skipped.entry((what, reason.to_string())).or_default() += n;
        }
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    /// The stable text operators and tests read.
    pub fn render(&self, dry_run: bool) -> String {
        let verb = if dry_run { "to import" } else { "imported" };
        let mut s = String::new();
        if dry_run {
            s.push_str("dry run: nothing was written\n");
        }
        for (what, c) in [
            (What::UserAgents, self.users),
            (What::Channels, self.channels),
            (What::Messages, self.messages),
        ] {
            s.push_str(&format!(
                "{}: {} {verb}, {} already imported\n",
                what.name(),
                c.imported,
                c.already
            ));
        }
        s.push_str(&format!("skipped: {}\n", self.skipped_total()));
        for ((what, reason), n) in &self.skipped {
            s.push_str(&format!("  {} ({reason}): {n}\n", what.name()));
        }
        s
    }
}

/// `done/total user agents`, redrawn at most ten times a second, only on
/// a terminal (a log file gets the summary alone).
pub struct Progress {
    enabled: bool,
    total: Option<u64>,
    done: u64,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(total: Option<u64>) -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            total,
            done: 0,
            last: None,
        }
    }

    pub fn tick(&mut self) {
        self.done += 1;
        if !self.enabled
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        self.draw();
    }

    fn draw(&self) {
        let line = match self.total {
            Some(t) if t > 0 => {
                let width = 30u64;
                let filled = (self.done.min(t) * width / t) as usize;
                format!(
                    "\r[{}{}] {}/{t} user agents",
                    "#".repeat(filled),
                    " ".repeat(width as usize - filled),
                    self.done
                )
            }
            _ => format!("\r{} user agents", self.done),
        };
        let mut err = std::io::stderr();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.enabled {
            self.draw();
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_reasons() {
        let mut s = Summary::default();
        s.users.imported = 2;
        s.messages.already = 3;
        s.skip(What::Messages, "expired", 1);
        s.skip(What::Messages, "expired", 1);
        s.skip(What::UserAgents, "gcm", 0);
        let text = s.render(false);
        assert!(text.contains("user agents: 2 imported, 0 already imported\n"));
        assert!(text.contains("messages: 0 imported, 3 already imported\n"));
        assert!(text.contains("skipped: 2\n  messages (expired): 2\n"));
        assert!(!text.contains("gcm"));
        assert!(s
            .render(true)
            .starts_with("dry run: nothing was written\nuser agents: 2 to import"));
    }
}
